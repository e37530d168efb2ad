#!/usr/bin/env bash
# Every GPU check of memformer in one prepared run (about 8 minutes on one H100/H200).
#
#   bash benchmarks/gpu_wheels.sh            # once, on a machine with network: wheels into .whl/
#   bash benchmarks/gpu_check.sh [OUT_DIR]   # on the GPU machine, in the repository root
#
# The GPU machine needs Python with torch (CUDA), triton, transformers, safetensors and pytest;
# what it lacks comes from the wheels in .whl/ (faiss-gpu for CUDA 12 and memformer's small
# pure-Python needs), installed without network into /tmp/site. Steps, each with its own time
# limit so one failure does not eat the others' time:
#   1. the GPU, driver and package versions          -> env.txt
#   2. the GPU-marked tests and the compiled Triton kernel tests -> tests.log
#   3. benchmarks/kernel_speed.py --quick (fused kernel vs the torch reference: prefill, decode, backward)
#   4. benchmarks/gpu_check.py index: 1M keys, exact on the GPU vs faiss IVF defaults
#   5. benchmarks/gpu_check.py ingest: memorize 1M tokens with a SmolLM2-135M-shaped backbone
# Results (and summary.md, one line per step with its status and seconds) go to OUT_DIR,
# default benchmarks/results/gpu/.
set -u
OUT_DIR=${1:-benchmarks/results/gpu}
PY=${PYTHON:-python3}
mkdir -p "$OUT_DIR"
SUMMARY=$OUT_DIR/summary.md
echo "# GPU check ($(date -u +%Y-%m-%dT%H:%MZ))" > "$SUMMARY"
echo "" >> "$SUMMARY"
echo "| step | status | seconds |" >> "$SUMMARY"
echo "|---|---|---:|" >> "$SUMMARY"

step() {   # step NAME LIMIT_S COMMAND...
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    echo "== $name (limit ${limit}s)"
    timeout "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
    local rc=$?
    local status=ok
    [ $rc -eq 124 ] && status="timed out"
    [ $rc -ne 0 ] && [ $rc -ne 124 ] && status="failed (rc $rc)"
    tail -n 5 "$OUT_DIR/$name.log"
    echo "| $name | $status | $((SECONDS - t0)) |" >> "$SUMMARY"
}

# 0. packages the machine lacks, and memformer itself, into /tmp/site (no network needed)
mkdir -p /tmp/site
if ls .whl/*.whl > /dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
$PY -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/site . \
    || echo "memformer did not install into /tmp/site"
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1

step env 60 bash -c "nvidia-smi; $PY - <<'PY'
import torch, triton
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)
print('gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)
try:
    import faiss
    print('faiss', faiss.__version__, 'gpus', faiss.get_num_gpus() if hasattr(faiss, 'get_num_gpus') else 0)
except Exception as e:
    print('faiss unavailable:', e)
PY"
cp "$OUT_DIR/env.log" "$OUT_DIR/env.txt"
step tests 120 $PY -m pytest -q -ra -m gpu -p no:cacheprovider tests
step kernels 150 $PY benchmarks/kernel_speed.py --quick --out "$OUT_DIR"
step index 120 $PY benchmarks/gpu_check.py index --keys 1M --out "$OUT_DIR"
step ingest 120 $PY benchmarks/gpu_check.py ingest --tokens 1M --out "$OUT_DIR"
cat "$SUMMARY"
