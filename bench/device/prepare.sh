#!/usr/bin/env bash
# Run HERE (a machine with network and Python 3.12), before a lent GPU machine is used:
# puts into the repo, git-ignored, what the device machine cannot fetch (it has no network):
#   .whl/      wheels for the device image's Python 3.12 (cp312) of the packages the image
#              lacks: DracoPy, meshoptimizer (built here from its sdist: PyPI has no wheel),
#              trimesh, zmesh, serra-mesh; and TensorStore, to run the version tested here;
#              and igneous-site-cp312.tar.xz: igneous (the peer of bench_main.py) with those
#              of its dependencies that the image lacks, in a site of its own (below)
#   .devdata/  a copy of the real volume (connectomics.zarr, 12 MB): ../shared does not travel;
#              and COMMIT, the commit and its files' blob hashes (no .git travels)
#   gpumesh/_dracoenc.cpython-312-x86_64-linux-gnu.so   the Draco encoder extension for 3.12
# and first runs the `gpu` tests over the CPU emulation (tests/cuda_emulation/dry_run_gpu_tests.sh,
# with this checkout's .venv), so that a bug in a test is found here, not in device time.
# Then call the device tool with bench/device/gpu_check.sh (see docs/gpu.md).
set -euo pipefail
cd "$(dirname "$0")/../.."
is312() { "$1" -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1; }
if [ -z "${PY312:-}" ]; then
  for c in python3.12 /root/.pyenv/versions/3.12*/bin/python; do
    if is312 "$c"; then PY312=$c; break; fi
  done
fi
is312 "${PY312:-none}" || { echo "need Python 3.12 (the device image's): set PY312" >&2; exit 1; }
DATA=${GPUMESH_DATA:-../shared/data}
echo "== the gpu tests over the emulation (a dry run)"
bash tests/cuda_emulation/dry_run_gpu_tests.sh
rm -rf .whl .devdata && mkdir -p .whl .devdata
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
"$PY312" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLAT[@]}" -d .whl DracoPy==2.2.0 trimesh==5.2.0 zmesh==1.15.0 serra-mesh==0.2.0 \
  tensorstore==0.1.86  # the version tested here; the image's is unknown
"$PY312" -m pip download -q --no-deps --no-binary=meshoptimizer -d /tmp/gpumesh-sdist meshoptimizer==0.2.30a0
"$PY312" -m pip wheel -q --no-deps -w .whl /tmp/gpumesh-sdist/meshoptimizer-0.2.30a0.tar.gz
# the extension, built against the cp312 DracoPy wheel's Draco (setup.py finds it beside DracoPy)
rm -rf /tmp/gpumesh-site312 && "$PY312" -m pip install -q --no-deps --target /tmp/gpumesh-site312 .whl/dracopy-*.whl
rm -rf /tmp/gpumesh-build312 && "$PY312" -m pip install -q setuptools --target /tmp/gpumesh-build312
PYTHONPATH=/tmp/gpumesh-site312:/tmp/gpumesh-build312 "$PY312" setup.py -q build_ext --inplace --force
# igneous in a site of its own (its DracoPy 1.x must not meet gpumesh's 2.x): igneous-pipeline
# and every dependency that the image lacks (bench/device/image-packages.txt), without what a
# meshing job never imports (dbscan, microviewer, posix_ipc, pbr, scripts and headers, tests;
# botocore's service data but S3's and STS's), shared objects stripped, in one archive: about
# 15 MB against 85 MB of wheels, so that everything travels within the device tool's 64 MiB.
IGN=/tmp/gpumesh-ign
rm -rf "$IGN" && mkdir -p "$IGN/whl"
"$PY312" -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLAT[@]}" -d "$IGN/whl" igneous-pipeline==4.37.0  # the version of bench/results' igneous rows
"$PY312" - "$IGN/whl" bench/device/image-packages.txt > "$IGN/list" <<'PY'
import os, re, sys
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
have = {norm(line.strip()) for line in open(sys.argv[2]) if line.strip() and not line.startswith("#")}
for wheel in sorted(os.listdir(sys.argv[1])):
    if norm(wheel.split("-")[0]) not in have:
        print(os.path.join(sys.argv[1], wheel))
PY
xargs "$PY312" -m pip install -q --no-index --no-deps --no-compile --target "$IGN/site" < "$IGN/list"
(
  cd "$IGN/site"
  rm -rf bin include lib64 share dbscan* microviewer* pbr* posix_ipc*
  find . -depth -type d \( -name __pycache__ -o -name tests \) -exec rm -rf {} +
  find botocore/data -mindepth 1 -maxdepth 1 -type d ! -name s3 ! -name sts -exec rm -rf {} +
  find . -name '*.so*' -type f -exec strip --strip-unneeded {} +
)
tar -C "$IGN/site" -cJf .whl/igneous-site-cp312.tar.xz .
cp -r "$DATA/connectomics.zarr" .devdata/
# the commit, for the result JSON: the device machine gets the working tree without .git, and
# bench_main.git_info reads this there, checking that the files are still the commit's
# (commit first; after a later commit, run this line again)
{ git rev-parse HEAD; git ls-tree -r -z HEAD; } > .devdata/COMMIT
ls -la .whl gpumesh/*.so && du -sh .whl .devdata
# what travels (tracked and untracked files, and the carry) must stay under the device tool's 64 MiB
travels() {
  { git ls-files -z; git ls-files -z --others --exclude-standard
    printf '%s\0' .whl .devdata gpumesh/_dracoenc.cpython-312-x86_64-linux-gnu.so; } \
    | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1
}
total=$(travels)
if [ "$total" -ge $((67108864 - (1 << 20))) ]; then
  # the largest wheel (~22 MB) is one the image has in a version of its own: gpu_check.sh prints
  # which TensorStore it ran with (64.3 MB of 64 MiB travelled in the thirty-eighth session)
  echo "$total bytes would travel, near the device tool's 64 MiB: the TensorStore wheel stays here"
  rm -f .whl/tensorstore-*.whl
  total=$(travels)
fi
echo "travels: $total bytes of 67108864"
[ "$total" -lt 67108864 ] || { echo "more than the device tool's 64 MiB would travel" >&2; exit 1; }
