#!/usr/bin/env bash
# The prepared GPU check (benchmarks/gpu_check.py says what it runs), from a clean checkout, at most ~8 min on
# one NVIDIA GPU. That machine reaches no package registry: fetch the pure-Python wheels preftune's checks need
# beyond its image (TRL and datasets with their own missing needs) here first, into .whl/ (git-ignored):
#   bash benchmarks/gpu_check.sh --fetch-wheels
# then, there (the device tool carries .whl):
#   bash benchmarks/gpu_check.sh OUT_DIR [gpu_check.py options]
# (with this workplace's device tool: command "bash benchmarks/gpu_check.sh $OUT", carry [".whl"], timeout 600;
# then copy gpu_check.json and gpu_check.txt into benchmarks/results/gpu/ and commit them)
#   bash benchmarks/gpu_check.sh OUT_DIR --cpu        # the same on CPU (tests/test_gpu_check.py runs this)
set -euo pipefail
cd "$(dirname "$0")/.."
# deepspeed's needs the GPU image lacks (it has einops, msgpack, ninja, psutil, py-cpuinfo): hjson, pydantic
WHEELS=(trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
        hjson==3.1.0 pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2)
if [[ "${1:-}" == "--fetch-wheels" ]]; then
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any -d .whl "${WHEELS[@]}"
  # PyPI has deepspeed as an sdist only: built here as install.sh builds it, a pure-Python wheel (~2 MB)
  DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps -w .whl deepspeed==0.19.8
  ls -l .whl
  exit 0
fi
OUT="${1:-benchmarks/results/gpu}"
shift || true
SITE="${PREFTUNE_SITE:-/tmp/preftune-site}"
WHEEL_DIR="${PREFTUNE_WHEELS:-.whl}"  # built for the GPU machine's Python 3.12
mkdir -p "$SITE"
if compgen -G "$WHEEL_DIR/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$WHEEL_DIR"/*.whl
fi
# preftune itself, from this checkout, without its dependencies (the image's torch, transformers, ... stay)
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --upgrade --target "$SITE" .
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import preftune; print('preftune installed at', preftune.__file__)"
exec python3 benchmarks/gpu_check.py --out "$OUT" "$@"
