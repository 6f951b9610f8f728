#!/usr/bin/env bash
# Everything one lent-GPU call does, in one go (see the device tool's notes in docs/performance.md):
#   1. dev/gpu_train.py: the Fashion-MNIST model candidates side by side, fitted to TRAIN_BUDGET seconds;
#   2. bench/gpu.sh: the GPU benchmark (issue 5), then model-only throughput of the wide candidate.
# Prepare on the dev machine first:
#   mkdir -p .gpu/fmnist && cp /usr/share/datasets/fashion-mnist/*.gz .gpu/fmnist/ && bash bench/gpu.sh --prepare
# then run it with carry [".gpu", ".whl"]: command "bash dev/gpu_session.sh". Results land in $OUT.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/styletag-gpu-out}
mkdir -p "$OUT"
TRAIN_BUDGET=${TRAIN_BUDGET:-330}
PY=python3
[[ -x .venv/bin/python ]] && PY=.venv/bin/python
exec > >(tee -a "$OUT/session.log") 2>&1
date -u
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.cuda.is_available())"
timeout $((TRAIN_BUDGET + 45)) "$PY" dev/gpu_train.py --budget "$TRAIN_BUDGET" --source .gpu/fmnist \
    --work /tmp/styletag-train --out "$OUT" ${TRAIN_ARGS:-} | grep -v "^.* \[[a-z0-9-]*\] epoch epoch=\([2-9]\|[0-9]*[1-9][0-9]\|[0-9]*[02-9]0\) "
echo "train driver exit ${PIPESTATUS[0]}"
timeout 150 bash bench/gpu.sh --out "$OUT" ${BENCH_ARGS:-}
echo "gpu bench exit $?"
if [[ -f "$OUT/fmnist-wide.safetensors" ]]; then
    timeout 45 bash bench/gpu.sh --skip decode,pipeline --model "$OUT/fmnist-wide.safetensors" --out /tmp/styletag-wide ${BENCH_ARGS:-} \
        && cp /tmp/styletag-wide/gpu.json "$OUT/gpu-wide.json"
fi
ls -l "$OUT"
date -u
