#!/usr/bin/env bash
# On a GPU machine (the device tool's H200, or any CUDA box): the GPU tests, then the training-speed benchmark,
# which runs the product's own training step beside the guide's recipe and the benchmark's older copy of the
# step, all in one process. Everything lands under $OUT (default bench/out); record the benchmark's rows with
#   python bench/results.py --add $OUT/train_speed_3b.json --run NAME
# Wheels the machine lacks may be carried in .whl/ (or the folder named by WHEELS; installed to /tmp/site first).
set -uo pipefail
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
WHEELS=${WHEELS:-.whl}
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/card.txt"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  python3 -m pytest -q -ra -m gpu tests/test_gpu.py -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -20
fi
# every-row: the rows of issue 20 in one process (bench/train_speed.py PRESETS; TRL's rows need its wheels)
VARIANTS=${VARIANTS:-every-row}
python3 bench/train_speed.py --size "${SIZE:-3b}" --steps "${STEPS:-24}" --warmup 6 --variants "$VARIANTS" \
  --repeat "${REPEAT:-1}" ${BENCH_ARGS:-} --out "$OUT" 2>&1 | tee "$OUT/train_speed.log" | grep -v "Loading weights\|Writing model" | tail -25
