#!/usr/bin/env bash
# imagen-jax on one GPU, in one command (issue 16): paper-preset train steps (images/s, MFU),
# the 64->256->1024 cascade's sampling time, and every kernel choice timed (bench/gpu/README.md).
#
# The GPU machine is expected to have jax[cuda] 0.11.x, flax, optax, orbax-checkpoint, torch,
# transformers (and absl-py, etils, protobuf, pyyaml, safetensors, sentencepiece, scipy, tqdm,
# pillow) installed and NO package index. What imagen-jax needs beyond that travels as wheels in
# bench/gpu/wheels/ (git-ignored). Fill it once, on a machine with the index, for CPython 3.12:
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d bench/gpu/wheels ml-collections==1.1.0 grain==0.2.18 array-record==0.8.6 portpicker==1.6.0 \
#     tensorboardX==2.6.5
#
# Then, on the GPU machine, from anywhere in the checkout:
#
#   bash bench/gpu/run.sh              # <= 8 min; appends to bench/gpu/results.jsonl
#   bash bench/gpu/run.sh --tiny       # the same sections with tiny presets (CPU: ~2 min)
#   bash bench/gpu/run.sh --sections=kernels,sample --num_images=4   # any gpu_bench.py flag
#
# PYTHON selects the interpreter (default python3). The run is cut at 480 s (BENCH_TIMEOUT; 900 s
# with --tiny, whose CPU compiles dominate); every section appends its results as it ends, so a
# cut run keeps what it measured.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}

shopt -s nullglob
wheels=(bench/gpu/wheels/*.whl)
if ((${#wheels[@]})); then
  "$PY" -m pip install -q --no-deps --no-index --no-compile "${wheels[@]}"
fi
if ! "$PY" -c "import ml_collections, grain, tensorboardX" 2>/dev/null; then
  echo "error: ml_collections / grain / tensorboardX missing: fill bench/gpu/wheels/ (see the" \
    "pip download command at the top of bench/gpu/run.sh)" >&2
  exit 2
fi
# The package itself without its dependencies; the source tree on PYTHONPATH works as well when
# the machine's setuptools cannot build it offline.
"$PY" -m pip install -q --no-deps --no-index --no-build-isolation -e . 2>/dev/null ||
  echo "note: editable install failed; running from the source tree"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# Leave XLA room for the 2.2B model's train state and activations.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
limit=480
for arg in "$@"; do [[ $arg == --tiny ]] && limit=900; done
exec timeout "${BENCH_TIMEOUT:-$limit}" "$PY" bench/gpu/gpu_bench.py "$@"
