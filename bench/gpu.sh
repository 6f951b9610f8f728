#!/usr/bin/env bash
# The GPU benchmark, in one go, for a lent GPU machine (torch + torchvision there; no Celery, boto3,
# Redis, PostgreSQL or SQLAlchemy). See bench/gpu_bench.py for what it measures; docs/performance.md.
#
#   bash bench/gpu.sh --prepare      # on the dev machine: fetch the wheels the GPU machine lacks into .whl/
#   bash bench/gpu.sh [--cpu] [--quick] [--model PATH] [--out DIR]
#
# On the device machine (the run tool): carry [".whl"], command "bash bench/gpu.sh"; gpu.json lands in
# $OUT. Without a GPU (or with --cpu) the same steps run on the CPU at small sizes.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=.whl
# What the GPU image lacks for the inline pipeline: SQLAlchemy (typing-extensions, click, tqdm,
# safetensors, prometheus-client, pillow and numpy are there). Python 3.12 there.
WHEEL_PYTHON=${STYLETAG_GPU_PYTHON_VERSION:-3.12}
REQS=("sqlalchemy==$(.venv/bin/python -c 'import sqlalchemy; print(sqlalchemy.__version__)' 2>/dev/null || echo 2.0.36)")

if [[ "${1:-}" == "--prepare" ]]; then
    mkdir -p "$WHEELS"
    grep -qxF "/$WHEELS/" .git/info/exclude 2>/dev/null || echo "/$WHEELS/" >> .git/info/exclude
    PIP=(python3 -m pip)
    [[ -x .venv/bin/python ]] && PIP=(.venv/bin/python -m pip)
    "${PIP[@]}" download -q --no-deps --only-binary=:all: --python-version "$WHEEL_PYTHON" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any -d "$WHEELS" "${REQS[@]}"
    ls -l "$WHEELS"
    exit 0
fi

if [[ -x .venv/bin/python ]]; then
    PY=.venv/bin/python
else
    PY=python3
fi
# Wheels carried from the dev machine: installed into a private folder, only if the module is missing.
if ! "$PY" -c "import sqlalchemy" 2>/dev/null; then
    if compgen -G "$WHEELS/*.whl" >/dev/null; then
        SITE=${TMPDIR:-/tmp}/styletag-gpu-site
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "gpu.sh: SQLAlchemy missing and no wheels in $WHEELS/: the pipeline part will be skipped" \
             "(run 'bash bench/gpu.sh --prepare' on the dev machine and carry $WHEELS)" >&2
    fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec "$PY" -m bench.gpu_bench "$@"
