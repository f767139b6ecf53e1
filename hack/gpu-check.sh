#!/usr/bin/env bash
# GPU checks of the trainer, for a machine with an NVIDIA GPU and the project installed
# (`pip install -e '.[trainer]'` plus deepspeed). Each check runs `python -m finetune_trainer` on a
# tiny Llama built locally (no downloads) and prints PASS or FAIL:
#   qlora      bitsandbytes 4-bit NF4 base on CUDA with a LoRA adapter
#   zero2-full DeepSpeed ZeRO stage 2 full fine-tune, one process per GPU
# Both run the trainer image's command (its ENTRYPOINT, as the operator leaves it) with the
# variables the operator sets on a one-pod job: NPROC_PER_NODE is the number of GPUs, so the
# trainer starts one rank per GPU itself (finetune_trainer.launcher).
# Usage: hack/gpu-check.sh    (PYTHON=/path/to/python to pick the interpreter; KEEP=1 keeps the work dir)
# Exit status: the number of failed checks (0 when all pass).
set -euo pipefail

PYTHON="${PYTHON:-python3}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")"
FAILED=0

cleanup() {
  if [[ "${KEEP:-0}" == "1" ]]; then
    echo "work dir kept: $WORK"
  else
    rm -rf "$WORK"
  fi
}
trap cleanup EXIT

export JOB_ID="gpu-check" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false POD_IP=127.0.0.1

trainer() {  # the image's ENTRYPOINT without tini (signals are not part of these checks)
  "$PYTHON" -m finetune_trainer "$@"
}

result() {  # result <check> <PASS|FAIL> <detail>
  printf '%-12s %s  %s\n' "$1" "$2" "$3"
  if [[ "$2" != "PASS" ]]; then
    FAILED=$((FAILED + 1))
  fi
}

preflight() {
  if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "nvidia-smi not found: this script needs a machine with an NVIDIA GPU" >&2
    exit 1
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PYTHON" - <<'EOF'
import sys

import torch

if not torch.cuda.is_available():
    sys.exit("torch.cuda.is_available() is False: install a CUDA build of torch")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}")
EOF
}

prepare() {  # a tiny model, a learnable dataset and one config per check, all under $WORK
  "$PYTHON" - "$WORK" <<'EOF'
import json
import sys
from pathlib import Path

from finetune_trainer.testing.cli import base_config
from finetune_trainer.testing.tiny import build_tiny_model, synthetic_dataset, write_jsonl

work = Path(sys.argv[1])
model = build_tiny_model(work / "model", hidden_size=128, layers=4)
data = write_jsonl(synthetic_dataset(1200, seed=0), work / "train.jsonl")
hyper = {"maxSteps": 40, "batchSize": 8, "learningRate": 1e-3, "loggingSteps": 10}
for name, method in (("qlora", {"type": "qlora"}), ("zero2-full", {"type": "full"})):
    config = base_config(model, data, work / name, method["type"], hyperparameters=hyper)
    config["goal"] = {"metrics": ["eval_loss"]}
    if name == "zero2-full":
        config["method"]["deepspeed"] = {"enabled": True, "stage": 2}
    else:
        config["method"]["quantization"] = {"quantType": "nf4", "doubleQuant": True, "computeDtype": "bfloat16"}
    (work / f"{name}.json").write_text(json.dumps(config, indent=2))
EOF
}

phase_of() {  # phase_of <report file>
  "$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1])).get("phase", "?"))' "$1" 2>/dev/null ||
    echo "no report"
}

check_qlora() {
  local log="$WORK/qlora.log" code=0
  NPROC_PER_NODE="$GPUS" trainer --config "$WORK/qlora.json" >"$log" 2>&1 || code=$?
  local phase
  phase="$(phase_of "$WORK/qlora/progress.json")"
  if [[ "$code" -eq 0 && -f "$WORK/qlora/final/adapter_model.safetensors" ]] &&
    grep -q '"device": "cuda"' "$log" && grep -q 'qlora adapter:' "$log"; then
    result qlora PASS "exit $code, phase $phase, 4-bit base on CUDA, $GPUS rank(s), adapter saved"
  else
    result qlora FAIL "exit $code, phase $phase (log: $log)"
    tail -n 20 "$log"
  fi
}

check_zero2() {
  local log="$WORK/zero2-full.log" code=0
  if ! "$PYTHON" -c 'import deepspeed' >/dev/null 2>&1; then
    result zero2-full FAIL "deepspeed is not installed (pip install deepspeed)"
    return
  fi
  NPROC_PER_NODE="$GPUS" trainer --config "$WORK/zero2-full.json" >"$log" 2>&1 || code=$?
  local phase
  phase="$(phase_of "$WORK/zero2-full/progress.json")"
  if [[ "$code" -eq 0 && -f "$WORK/zero2-full/final/model.safetensors" ]] && grep -qi 'zero' "$log"; then
    result zero2-full PASS "exit $code, phase $phase, ZeRO-2 on CUDA, $GPUS rank(s), full weights saved"
  else
    result zero2-full FAIL "exit $code, phase $phase (log: $log)"
    tail -n 20 "$log"
  fi
}

preflight
GPUS="$(nvidia-smi -L | grep -c '^GPU')"
prepare
check_qlora
check_zero2
echo "failed checks: $FAILED"
exit "$FAILED"
