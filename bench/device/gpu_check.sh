#!/usr/bin/env bash
# Run THERE, on a lent GPU machine, from the repo root, after bench/device/prepare.sh ran here:
#   run(command="bash bench/device/gpu_check.sh", timeout_s=600,
#       carry=[".whl", ".devdata", "gpumesh/_dracoenc.cpython-312-x86_64-linux-gnu.so"])
# Stages, each capped so the whole stays inside BUDGET seconds (default 540):
#   1. install the carried wheels (the image has numpy, numba, tensorstore, scipy, cupy, pytest)
#   2. tests/test_gpu.py: emulation + NVRTC + the `gpu` tests on the device (if any fails,
#      the small ones again under compute-sanitizer's memcheck, to sanitizer.log); then
#      `gpumesh warmup --device gpu` (its CUDA part has run nowhere else)
#   3. bench/bench_gpu.py: kernel throughput, CPU path and peers, real and 1024^3 tiled volumes
#   4. the main job on the real volume, --device gpu then --device cpu, every core, and a
#      byte comparison of the two outputs; then --device gpu with the hash weld
#      (GPUMESH_WELD=hash), compared too (TILED=1: also the 1024^3 tiled volume on the GPU;
#      TASKS=1: also bench_tasks.py, every task alone with the GPU backend; BITS10=1: also
#      --device gpu --bits 10, whose Draco encoding is ~2.3x faster than at the default 16;
#      ADHOC=1: also bench_adhoc.py, one segment ad hoc on the GPU against zmesh)
#   5. with the time left: the main job --device gpu against igneous (one process per core,
#      from .whl/igneous-site-cp312.tar.xz) in one bench_main.py run, for their ratio
# STAGES=tests,bench (comma-separated: tests = 2, bench = 3, main = 4, igneous = 5; default all)
# runs those alone after the install, so that a first, shorter call can be looked at before the
# rest runs in a second (the machine stays warm only ~30 s between calls), or a failed stage be
# run again on a fresh machine within the device time left.
# Logs and result JSON go to $OUT (check.log, pytest_gpu.log, sanitizer.log, results/*.json): commit the
# JSON to bench/results/ and cite the figures in docs/gpu.md.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/gpumesh-out}
WORK=${WORK:-/tmp}   # the wheels' site, the main jobs' outputs, igneous's site
mkdir -p "$OUT/results"
PY=${PYTHON:-python3}
BUDGET=${BUDGET:-540}
T0=$(date +%s)
exec > >(tee -a "$OUT/check.log") 2>&1
left() { local l=$((BUDGET - ($(date +%s) - T0))); [ "$l" -lt "$1" ] && echo "$l" || echo "$1"; }
stage() { echo; echo "== [$(( $(date +%s) - T0 )) s] $*"; }
# bench_main.py within at most $1 s: its children run in process groups of their own, which
# `timeout` would leave running (no result JSON either), so its own --timeout stops each child
# 15 s sooner and the JSON is written
bmain() {
  local t; t=$(left "$1"); shift
  if [ "$t" -lt 30 ]; then echo "left out: ${t} s left"; return 1; fi
  timeout "$t" "$PY" bench/bench_main.py --timeout $((t - 15)) --results-dir "$OUT/results" "$@"
}
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 GPUMESH_DATA="$PWD/.devdata"
STAGES=${STAGES:-tests,bench,main,igneous}
want() { case ",$STAGES," in *",$1,"*) return 0 ;; *) echo "(stage $1 left out: STAGES=$STAGES)"; return 1 ;; esac; }
for s in ${STAGES//,/ }; do
  case "$s" in tests|bench|main|igneous) ;; *) echo "STAGES: no stage $s (tests, bench, main, igneous)"; exit 2 ;; esac
done

stage "install carried wheels"
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target "$WORK/site" .whl/*.whl || exit 1
export PYTHONPATH="$WORK/site:$PWD"
"$PY" - <<'PY'
import importlib.metadata as md, sys
def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None
print(sys.version.split()[0], *(f"{n} {version(n)}" for n in
      ("numpy", "numba", "tensorstore", "ml_dtypes", "scipy", "cupy-cuda12x", "cupy-cuda13x",
       "DracoPy", "meshoptimizer", "zmesh", "serra-mesh", "trimesh")), sep="; ")
import tensorstore
print("tensorstore from", tensorstore.__file__)
PY
"$PY" -c 'import sys; sys.path.insert(0, "bench"); import bench_main; print("git", bench_main.git_info())'
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
nproc; free -g | head -2
# igneous in its own site (prepare.sh): its DracoPy 1.x must not meet gpumesh's 2.x
IGNEOUS_PY=""
if [ -f .whl/igneous-site-cp312.tar.xz ]; then
  rm -rf "$WORK/ignsite"
  "$PY" -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter="data")' \
    .whl/igneous-site-cp312.tar.xz "$WORK/ignsite" \
    && printf '#!/bin/sh\nPYTHONPATH=%s exec %s "$@"\n' "$WORK/ignsite" "$(command -v "$PY")" > "$WORK/ignpy" \
    && chmod +x "$WORK/ignpy" && IGNEOUS_PY="$WORK/ignpy"
fi
if ! "$PY" -c "import gpumesh._dracoenc"; then
  stage "build the Draco extension here"
  "$PY" setup.py -q build_ext --inplace || echo "no extension: DracoPy.encode is used (slower)"
fi
"$PY" -c "import gpumesh, gpumesh.encode as e; print('gpumesh', gpumesh.__file__, 'dracoenc', e._dracoenc is not None)"

if want tests; then
stage "tests/test_gpu.py (emulation, NVRTC, gpu)"
GPUMESH_REQUIRE_GPU=1 timeout "$(left 200)" "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_gpu.py 2>&1 \
  | tee "$OUT/pytest_gpu.log" | tail -25
gpu_tests=${PIPESTATUS[0]}
SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
if [ "$gpu_tests" -ne 0 ] && [ -n "$SANITIZER" ]; then
  # a kernel bug shows here as the bad access itself (where the runtime allows it: Firecracker)
  stage "the gpu tests failed ($gpu_tests): the small ones again under compute-sanitizer memcheck"
  timeout "$(left 120)" "$SANITIZER" --tool memcheck --print-limit 20 "$PY" -m pytest -q -p no:cacheprovider \
    -m gpu tests/test_gpu.py -k "random_labels or grid_stride or hash_weld" 2>&1 \
    | tee "$OUT/sanitizer.log" | tail -40
fi

stage "gpumesh warmup --device gpu (CUDA modules into CuPy's cache, a trial mesh on the device)"
timeout "$(left 30)" "$PY" -m gpumesh.cli warmup --dtype uint32 --device gpu 2>&1 | tail -8
fi

if want bench; then
stage "bench_gpu.py"
timeout "$(left 200)" "$PY" bench/bench_gpu.py --results-dir "$OUT/results" 2>&1 | tail -30
fi

NO_PEERS=zmesh,serra,igneous,mesh-n-bone   # bench_main.py --skip: every peer (igneous runs once, below)
if want main; then
for dev in gpu cpu; do
  stage "main job, --device $dev"
  rm -rf "$WORK/main-$dev"
  bmain 100 --skip $NO_PEERS --gpumesh-args "--device $dev" --out-dir "$WORK/main-$dev" --keep 2>&1 | tail -14
done
stage "main job output: GPU run == CPU run, byte for byte"
diff -rq "$WORK/main-gpu/gpumesh-out" "$WORK/main-cpu/gpumesh-out" && echo "IDENTICAL OUTPUT"
stage "main job, --device gpu with the hash weld (GPUMESH_WELD=hash), and its output == CPU run's"
rm -rf "$WORK/main-gpuhash"
GPUMESH_WELD=hash bmain 100 --skip $NO_PEERS --gpumesh-args "--device gpu" --out-dir "$WORK/main-gpuhash" --keep \
  2>&1 | tail -6
diff -rq "$WORK/main-gpuhash/gpumesh-out" "$WORK/main-cpu/gpumesh-out" && echo "IDENTICAL OUTPUT (hash weld)"
if [ "${TILED:-0}" = 1 ]; then
  stage "main job on the 1024^3 tiled volume, --device gpu"
  "$PY" bench/tiled.py "$WORK/tiled1024.zarr" --source "$GPUMESH_DATA/connectomics.zarr"
  bmain 200 --source "$WORK/tiled1024.zarr" --skip $NO_PEERS --gpumesh-args "--device gpu" 2>&1 | tail -8
fi
if [ "${TASKS:-0}" = 1 ]; then
  stage "the main job's tasks one by one, --device gpu (bench_tasks.py)"
  timeout "$(left 150)" "$PY" bench/bench_tasks.py --device gpu --results-dir "$OUT/results" 2>&1 | tail -14
fi
if [ "${BITS10:-0}" = 1 ]; then
  stage "main job, --device gpu --bits 10"
  bmain 100 --skip $NO_PEERS --gpumesh-args "--device gpu --bits 10" 2>&1 | tail -6
fi
if [ "${ADHOC:-0}" = 1 ]; then
  stage "ad-hoc meshing of one segment, --device gpu, against zmesh (bench_adhoc.py)"
  timeout "$(left 90)" "$PY" bench/bench_adhoc.py --device gpu --repeat 3 --results-dir "$OUT/results" 2>&1 | tail -8
fi
fi
ign_s=$(left 330)
if ! want igneous; then
  :
elif [ -n "$IGNEOUS_PY" ] && [ "$ign_s" -ge 120 ]; then
  # igneous's forge on 512^3 is 8 tasks of 448^3 (its CLI default), so it ends with its
  # slowest; a child past --timeout is recorded as its row's error, and the JSON still written
  stage "main job --device gpu against igneous, $(nproc) processes each (bench_main.py)"
  timeout "$ign_s" "$PY" bench/bench_main.py --skip zmesh,serra,mesh-n-bone --igneous-python "$IGNEOUS_PY" \
    --timeout $((ign_s - 60)) --gpumesh-args "--device gpu" --results-dir "$OUT/results" 2>&1 | tail -10
elif [ -n "$IGNEOUS_PY" ]; then
  echo "igneous left out: ${ign_s} s left"
fi
stage "done"
