#!/usr/bin/env bash
# Creates bench/peer/.venv-peer: CPU torch 2.13.0 + imagen-pytorch, for bench/vs_imagen_pytorch.py.
#
#   bash bench/peer/setup.sh            # idempotent; ~30-60 s on a fresh machine
#
# The peer lives in its own venv and is never a dependency of imagen-jax. torch is pinned through a
# constraint file: an unpinned torch (pulled in by imagen-pytorch's unpinned torchvision) resolves to
# CUDA builds (shared/reference/env-notes.md section 8). On these machines torch==2.13.0 resolves to
# a local CPU wheel (pip's find-links).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$HERE/.venv-peer"
PY="${PYTHON:-python3}"
# imagen_pytorch imports torchvision, whose PyPI wheel needs shim 1 (shims.py) to import at all.
CHECK="import sys; sys.path.insert(0, '$HERE'); import shims; shims.apply(); import imagen_pytorch"
if [ -x "$VENV/bin/python" ] && HF_HUB_OFFLINE=1 "$VENV/bin/python" -c "$CHECK" 2>/dev/null; then
  echo "peer venv ready: $VENV"
  exit 0
fi
"$PY" -m venv "$VENV"
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "torch==2.13.0" > "$CONSTRAINTS"
"$VENV/bin/pip" install -q torch==2.13.0
"$VENV/bin/pip" install -q -c "$CONSTRAINTS" imagen-pytorch==2.1.0
HF_HUB_OFFLINE=1 "$VENV/bin/python" -c "
import sys; sys.path.insert(0, '$HERE')
import shims; shims.apply()
import imagen_pytorch, torch
print('peer venv ready:', '$VENV', 'torch', torch.__version__, 'imagen-pytorch', imagen_pytorch.__version__ if hasattr(imagen_pytorch, '__version__') else '2.1.0')
"
