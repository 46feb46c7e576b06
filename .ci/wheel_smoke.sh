#!/usr/bin/env bash
# Wheel smoke test: build the wheel, install it (not editable, with its dependencies) in a fresh
# venv, and run the console scripts from a directory outside the checkout: train the `shapes:ci`
# config for a few steps, then sample one image from it. Fails on any non-zero exit.
# Usage: bash .ci/wheel_smoke.sh   (from .ci/run; reuses pip's cache and an XLA compilation cache)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
PYTHON="${PYTHON:-python3}"
export PIP_CONSTRAINT="$ROOT/.ci/constraints.txt"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
trap 'exit 143' TERM  # (an EXIT trap alone does not run when bash is killed)
trap 'exit 130' INT
# Compiled XLA programs persist between CI runs (like pip's cache): a warm run compiles nothing.
CACHE="${IMAGEN_JAX_CI_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/imagen-jax-ci}"
export JAX_COMPILATION_CACHE_DIR="$CACHE/xla" JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
start=$SECONDS

# Build from a copy of the tracked and new (not ignored) files: a build/ left in the checkout by
# an earlier build could put deleted modules into the wheel.
mkdir "$TMP/src"
git ls-files -z --cached --others --exclude-standard \
  | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
  | tar --null -T - -cf - | tar -xf - -C "$TMP/src"
# (Some machines' pip config names index locations that do not exist: their warnings are noise.)
"$PYTHON" -m pip wheel --quiet --no-deps -w "$TMP/dist" "$TMP/src" 2> >(grep -v "WARNING: Location" >&2)
WHEEL="$(ls "$TMP"/dist/imagen_jax-*.whl)"
echo "wheel: $(basename "$WHEEL") ($(( SECONDS - start )) s)"

"$PYTHON" -m venv "$TMP/venv"
rm -rf "$TMP/src"
# --no-compile: byte-compiling every dependency costs more than the rest of the install; Python
# compiles what it imports.
"$TMP/venv/bin/python" -m pip install --quiet --no-compile "$WHEEL" 2> >(grep -v "WARNING: Location" >&2)
"$TMP/venv/bin/python" -m pip check
echo "installed ($(( SECONDS - start )) s)"

# From a directory outside the checkout, with nothing of it on sys.path.
cd "$TMP"
unset PYTHONPATH
where="$("$TMP/venv/bin/python" -c 'import imagen_jax; print(imagen_jax.__file__)')"
case "$where" in
  "$TMP/venv/"*/site-packages/imagen_jax/__init__.py) ;;
  *) echo "imagen_jax imported from $where, not the installed wheel" >&2; exit 1 ;;
esac
# Training's own end-of-stage samples are off and sampling takes 2 steps a stage: samplers (with
# their progress callbacks) are not kept in the compilation cache, so they compile every run.
# The base stage only, to keep CI short (both stages are trained by the test suite). The runtime
# install has no torch: any library warning in stderr (e.g. transformers' torch advisory) fails.
"$TMP/venv/bin/imagen-jax-train" --config=shapes:ci --workdir="$TMP/run" \
  --config.train_stages=base --config.stages.base.final_eval=False 2> "$TMP/train.err"
"$TMP/venv/bin/imagen-jax-sample" --workdir="$TMP/run" --stages=base --num_images=1 \
  --prompt="a red circle" --set='*.steps=2' 2> "$TMP/sample.err"
test -f "$TMP/run/samples_cli/grid.png"
if grep -E "^W[0-9]{4} |WARNING|(Deprecation|Future|User|Runtime)Warning|PyTorch was not found" \
    "$TMP/train.err" "$TMP/sample.err"; then
  echo "wheel smoke test: stray warnings in stderr (above)" >&2
  exit 1
fi
echo "wheel smoke test passed in $(( SECONDS - start )) s"
