#!/usr/bin/env bash
# Wheels that benchmarks/gpu.sh needs and the GPU machine's image lacks, downloaded here into
# .whl/ at the repository root (git-ignored) for the image's Python. The image has torch,
# triton, numba, numpy, scipy, pyyaml, matplotlib and pytest, but no gensim, whose package also
# holds WordSim353: without it gpu.sh can measure neither WordSim353 nor time to quality.
# Run it before the device session, then pass carry=[".whl"] to the device's `run`; gpu.sh
# unpacks .whl/*.whl into a temporary folder on its PYTHONPATH.
#
#   benchmarks/gpu_wheels.sh            (PYVER=3.12 by default: the image's python3)
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
PYVER=${PYVER:-3.12}
PLATFORMS=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1; do
  PLATFORMS+=(--platform "${tag}_x86_64")
done
mkdir -p "$REPO/.whl"
# gensim's own needs beyond the image: smart_open, and wrapt (smart_open's).
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYVER" \
  --implementation cp "${PLATFORMS[@]}" -d "$REPO/.whl" gensim smart_open wrapt
ls -l "$REPO/.whl"
du -sh "$REPO/.whl"
