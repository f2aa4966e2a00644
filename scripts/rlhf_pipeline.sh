#!/usr/bin/env bash
# The whole RLHF recipe on the embedded SmolLM2, from a fresh checkout (README "The RLHF pipeline"):
#   1. instruction tuning (a short SFT run on the routing task), merged into a full model folder;
#   2. a reward model learnt from rule-decided preference pairs (right team code over a wrong one);
#   3. PPO on the instruction-tuned model against that reward model, with a KL leash to it.
# Prints the wall time of each stage. Set TUNEFORGE=... to use another command (default: .venv/bin/tuneforge).
set -euo pipefail
cd "$(dirname "$0")/.."
TF=${TUNEFORGE:-.venv/bin/tuneforge}
PY=${PYTHON:-.venv/bin/python}
stage() { local name=$1; shift; local t0=$SECONDS; "$@"; echo "== $name: $((SECONDS - t0)) s"; }
stage data bash -c "$PY scripts/make_demo_data.py && $PY scripts/make_preference_demo.py"
stage "1 sft" "$TF" train configs/rlhf_sft.yaml --overwrite
stage "1 merge" "$TF" merge --model smollm2-135m-instruct --adapter runs/rlhf_sft/final --out runs/rlhf_sft_merged
stage "2 reward" "$TF" train configs/reward_demo.yaml --overwrite
stage "3 ppo" "$TF" train configs/rlhf_ppo.yaml --overwrite
echo "== total: $SECONDS s"
