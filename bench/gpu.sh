#!/usr/bin/env bash
# Self-contained GPU check, under 4 minutes on one GPU (H100 class): a randomly initialised model of
# Llama-3.2-1B's shape (hidden 2048, 16 layers, 32 heads / 8 KV heads, MLP 8192, vocab 128256), float32
# master weights + bf16 autocast, packed rows of 2048 tokens, LoRA and full fine-tuning through tuneforge's
# loop, and the same through TRL's SFTTrainer when trl is installed. Prints tokens/s, peak GPU memory and MFU
# against this GPU's measured bf16 matmul rate, and writes bench/results/gpu-<timestamp>.md/.json.
# No network, no model download, no data files.
#
#   bash bench/gpu.sh                 # the check (needs CUDA)
#   bash bench/gpu.sh --cpu-smoke     # toy size on the CPU: checks the harness, numbers mean nothing
#   bash bench/gpu.sh --sides tuneforge --cases lora --steps 20   # any bench/gpu.py option
#
# Needs: torch with CUDA, transformers, peft, and this checkout (tuneforge is imported from it); trl optional.
# PYTHON=/path/to/python picks the interpreter (default: .venv/bin/python if present, else python3).
# GPU_BENCH_TIMEOUT (default 230 s) bounds the whole run; each child run is bounded too (bench/gpu.py).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
if ! "$PY" -c "import torch, transformers, peft" 2>/dev/null; then
  echo "bench/gpu.sh: $PY lacks torch/transformers/peft; set PYTHON=... to an environment that has them" >&2
  exit 2
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
exec timeout --signal=TERM --kill-after=10 "${GPU_BENCH_TIMEOUT:-230}" "$PY" bench/gpu.py "$@"
