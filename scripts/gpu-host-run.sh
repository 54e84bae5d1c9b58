#!/usr/bin/env bash
# Runs the GPU suite on a GPU host without network access (the one in ../shared/notes/gpu-host.md):
# installs the wheels carried there (a tar split into parts under $PARTS), makes the venv's onnxruntime the
# GPU build (one onnxruntime per environment), installs this project without its dependencies, then runs
#   pytest -m gpu --model base --server local  (plus PYTEST_EXTRA)
# then the split captioner with every model on the GPU (caption correctness, latency and load),
# writing the report and the baselines it records under $OUT_DIR.
#
# usage: PARTS=/tmp/parts OUT_DIR=/tmp/out bash scripts/gpu-host-run.sh [extra pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
PARTS=${PARTS:-/tmp/parts}
OUT_DIR=${OUT_DIR:-/tmp/blip-gpu-out}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT_DIR"

if ! "$PYTHON" -c "import tritonclient, pytriton" 2>/dev/null; then
    wheels=$(mktemp -d)
    cat "$PARTS"/part* | tar xf - -C "$wheels"
    # The GPU build replaces the CPU one: both own the `onnxruntime` import package.
    "$PYTHON" -m pip uninstall -q -y onnxruntime onnxruntime-gpu || true
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile "$wheels"/*.whl
    rm -rf "$wheels"
fi
"$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation -e . >/dev/null || {
    echo "editable install failed (setuptools too old?); see pip's output above" >&2
    exit 3
}

# The CUDA provider's libraries (cuBLAS, cuDNN, the CUDA runtime) ship as pip packages in the venv; the
# Python backend stub inherits tritonserver's environment.
site=$("$PYTHON" -c "import site; print(site.getsitepackages()[0])")
LD_LIBRARY_PATH=$(find "$site/nvidia" -maxdepth 3 -type d -name lib 2>/dev/null | paste -sd: -):${LD_LIBRARY_PATH:-}
export LD_LIBRARY_PATH
export BLIP_BENCH_CACHE=${BLIP_BENCH_CACHE:-/tmp/blip-cache}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
"$PYTHON" -c "import onnxruntime as o, numpy, torch; print('onnxruntime', o.__version__, o.get_available_providers(), 'numpy', numpy.__version__, 'torch', torch.__version__)"

# The split captioner on CUDA: the seed's three captioner folders with every instance group made KIND_GPU (the
# captioner's in-process decoder then runs on the CUDA provider with its cache on the device).
gpu_captioner="$OUT_DIR/gpu-captioner-repository"
rm -rf "$gpu_captioner" && mkdir -p "$gpu_captioner"
cp -r model_repository/blip_caption model_repository/blip_caption_vision model_repository/blip_caption_decoder "$gpu_captioner"/
sed -i 's/kind: KIND_CPU/kind: KIND_GPU/' "$gpu_captioner"/*/config.pbtxt

set +e
"$PYTHON" -m pytest suite -m gpu --model base --server local --require-gpus 1 -p no:cacheprovider \
    --report-dir="$OUT_DIR/report" --baseline-dir="$OUT_DIR/baselines" "$@"
status=$?
"$PYTHON" -m pytest suite/test_captioner.py suite/test_caption_latency.py suite/test_caption_load.py --model base \
    --server local -p no:cacheprovider --model-repository "$gpu_captioner" --caption-concurrency 1:8:7 \
    --report-dir="$OUT_DIR/report-captioner" --baseline-dir="$OUT_DIR/baselines" "$@"
status=$((status | $?))
set -e
cp -r /tmp/pytest-of-*/pytest-current/tritonserver*/ "$OUT_DIR/server-logs" 2>/dev/null || true
exit $status
