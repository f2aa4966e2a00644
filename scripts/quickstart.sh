#!/usr/bin/env bash
# The quick start: install into ./.venv, then run the demo (LoRA instruction tuning of the embedded
# SmolLM2-135M-Instruct, base versus tuned accuracy on held-out examples).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/python scripts/make_demo_data.py
exec .venv/bin/tuneforge train configs/demo.yaml "$@"
