"""Crash-safe file helpers: whole files replaced atomically, JSON lines appended whole."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .errors import DataError, OutputError


def ensure_dir(path: str | Path, what: str = "output folder") -> Path:
    """Create ``path`` (and parents) or raise OutputError naming the problem."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise OutputError(f"{what} {str(p)!r} is a file, not a folder; choose another path")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {what} {str(p)!r} ({exc.strerror}); choose a writable path") from None
    if not os.access(p, os.W_OK | os.X_OK):
        raise OutputError(f"{what} {str(p)!r} is not writable; choose a writable path")
    return p


def check_output_file(path: str | Path, what: str = "output") -> Path:
    """A file path that can be written: its folder exists or can be made, and it is not a folder.

    Called before any work starts, so a bad ``--out`` costs nothing.
    """
    p = Path(path)
    if p.is_dir():
        raise OutputError(f"{what} path {str(p)!r} is a folder; give a file name, e.g. {str(p / 'out.json')!r}")
    parent = p.parent if str(p.parent) else Path(".")
    ensure_dir(parent, "output folder")
    if p.exists() and not os.access(p, os.W_OK):
        raise OutputError(f"{what} file {str(p)!r} is not writable; choose another path")
    return p


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, fsync, then rename over it.

    A reader (or a rerun after kill -9) sees the old file or the new one, never half of it.
    """
    p = Path(path)
    ensure_dir(p.parent if str(p.parent) else ".", "output folder")
    if p.is_dir():
        raise OutputError(f"output path {str(p)!r} is a folder; give a file name")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    except OSError as exc:
        raise OutputError(f"cannot write {str(p)!r} ({exc.strerror}); choose a writable path") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def read_text(path: str | Path, what: str = "file") -> str:
    p = Path(path)
    if not p.exists():
        raise DataError(f"{what} {str(p)!r} does not exist; check the path")
    if p.is_dir():
        raise DataError(f"{what} {str(p)!r} is a folder; give a file")
    try:
        return p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(f"{what} {str(p)!r} is not UTF-8 text; give the file SADRA wrote") from None
    except OSError as exc:
        raise DataError(f"cannot read {what} {str(p)!r} ({exc.strerror}); check its permissions") from None


def parse_json_object(text: str, what: str, fix: str) -> dict[str, Any]:
    """A JSON object from ``text``, or DataError naming ``what`` and the ``fix``."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{what} does not parse ({exc.msg} at line {exc.lineno}); {fix}") from None
    if not isinstance(data, dict):
        raise DataError(f"{what} is not an object; {fix}")
    return data


def read_json(path: str | Path, what: str = "JSON file") -> Any:
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{what} {str(path)!r} does not parse ({exc.msg}, line {exc.lineno}); regenerate it") from None


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """Append one JSON object as one line with a single write, then fsync.

    If an earlier writer died mid-line (the file does not end in a newline), the torn tail is
    dropped first by an atomic rewrite, so every line in the file always parses.
    """
    p = Path(path)
    line = json.dumps(record, default=_json_default, allow_nan=True) + "\n"
    if p.exists() and p.stat().st_size > 0:
        data = p.read_bytes()
        if not data.endswith(b"\n"):
            keep = data[: data.rfind(b"\n") + 1]
            atomic_write_text(p, keep.decode("utf-8", errors="replace"))
    try:
        fd = os.open(p, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as exc:
        raise OutputError(f"cannot append to {str(p)!r} ({exc.strerror}); choose a writable --out") from None
    try:
        os.write(fd, line.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Every whole, parseable JSON object line of ``path`` (a torn last line is skipped)."""
    p = Path(path)
    if not p.exists():
        return []
    out = []
    for raw in p.read_text(encoding="utf-8", errors="replace").splitlines():
        raw = raw.strip()
        if not raw:
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            out.append(obj)
    return out
