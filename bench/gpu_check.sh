#!/usr/bin/env bash
# One-shot GPU check for a lent H100 (no network; torch 2.11 / Triton 3.6 / transformers there).
# Run from the repository root:   bash bench/gpu_check.sh
# Prepare the carried wheels first (bench/README.md); they live in the git-ignored .whl/.
#
# Steps, all under 8 minutes of wall clock (TOTAL_S below), everything written under $OUT
# (at most 9 files):
#   1. install the carried wheels (liger-kernel, cut-cross-entropy) into /tmp/site
#   2. environment report                                        -> $OUT/env.txt
#   3. CUDA tests: IWSFT_TEST_CUDA=1 pytest tests -x -q          -> $OUT/tests.log
#   3b. tile-config / chunk-budget sweep (bench/tune_sm90.py: 38 measurements, ~70 s expected,
#       capped at TUNE_S)                                         -> $OUT/tune-sm90-<date>.json
#   4. full loss benchmark (bf16; 7B, 0.5B, 32B heads; N 2k..32k) -> $OUT/<device>-<date>.{json,md}
#      (cells past the time budget are recorded as "skipped"; the JSON is rewritten per cell)
#   5. plots                                                     -> $OUT/<device>-<date>-{time,memory}.png
#   and the whole console log                                    -> $OUT/gpu_check.log
set -uo pipefail

OUT=${OUT:-$PWD/gpu_out}
TOTAL_S=${TOTAL_S:-465}     # hard wall-clock budget of this script
TESTS_S=${TESTS_S:-170}     # cap for the CUDA tests
TUNE_S=${TUNE_S:-100}       # cap for the tuning sweep (SKIP_TUNE=1 skips it)
# for a dry run of this script without a GPU: BENCH_DEVICE=cpu SKIP_TESTS=1
# BENCH_EXTRA="--heads tiny --ns 256 --seq-len 128 --inprocess"
BENCH_DEVICE=${BENCH_DEVICE:-cuda}
BENCH_EXTRA=${BENCH_EXTRA:-}
mkdir -p "$OUT"
T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1

echo "== 1. carried wheels"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
else
  echo "no .whl/ folder: Liger and CCE cells will be recorded as n/a"
fi

echo "== 2. environment [$(elapsed)s]"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 - <<'EOF'
import importlib.metadata as md, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name(), torch.cuda.get_device_capability())
for name in ("triton", "transformers", "liger-kernel", "cut-cross-entropy", "pytest"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "missing")
print("torch has F.linear_cross_entropy:", hasattr(torch.nn.functional, "linear_cross_entropy"))
EOF
} 2>&1 | tee "$OUT/env.txt"

echo "== 3. CUDA tests [$(elapsed)s]"
if [ "${SKIP_TESTS:-0}" = 1 ]; then
  echo "skipped (SKIP_TESTS=1)"
else
  IWSFT_TEST_CUDA=1 timeout "$TESTS_S" python3 -m pytest tests -x -q -p no:cacheprovider \
    > "$OUT/tests.log" 2>&1
  echo "tests rc=$? (124 = hit the ${TESTS_S}s cap); tail:"
  tail -n 25 "$OUT/tests.log"
fi

echo "== 3b. tuning sweep [$(elapsed)s]"
if [ "${SKIP_TUNE:-0}" = 1 ] || [ "$BENCH_DEVICE" != cuda ]; then
  echo "skipped (SKIP_TUNE=1 or BENCH_DEVICE=$BENCH_DEVICE)"
else
  timeout "$TUNE_S" python3 -m bench.tune_sm90 --out-dir "$OUT" --time-budget $(( TUNE_S - 25 ))
  echo "tune rc=$? (124 = killed at the ${TUNE_S}s cap; the JSON holds every finished measurement)"
fi

LEFT=$(( TOTAL_S - $(elapsed) - 25 ))   # keep ~25 s for the plots
SOFT=$(( LEFT - 45 )); [ "$SOFT" -lt 1 ] && SOFT=1   # start no new cell after this
echo "== 4. benchmark [$(elapsed)s], ${LEFT}s left for it"
if [ "$LEFT" -gt 30 ]; then
  # shellcheck disable=SC2086
  timeout "$LEFT" python3 -m bench.bench_loss --device "$BENCH_DEVICE" --out-dir "$OUT" \
    --time-budget "$SOFT" --cache-dir /tmp/iwsft-bench-cache $BENCH_EXTRA
  echo "bench rc=$? (124 = killed at the cap; the JSON holds every finished cell)"
else
  echo "no time left for the benchmark"
fi

rm -f "$OUT"/*.tmp   # a half-written file from a bench killed at the cap

echo "== 5. plots [$(elapsed)s]"
for j in "$OUT"/*.json; do
  case "$(basename "$j")" in tune-*|'*.json') continue ;; esac   # the sweep's JSON has no plot
  timeout 40 python3 -m bench.plot "$j" || echo "plot failed for $j"
done
echo "== done in $(elapsed)s; files:"
ls -la "$OUT"
sleep 1  # let tee flush gpu_check.log
