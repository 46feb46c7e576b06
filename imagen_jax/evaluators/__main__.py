"""``python -m imagen_jax.evaluators``: see :mod:`imagen_jax.evaluators.cli`."""

import sys

from imagen_jax.evaluators.cli import main

sys.exit(main())
