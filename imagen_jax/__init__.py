"""imagen-jax: Imagen text-to-image diffusion cascades in JAX and Flax NNX.

  from imagen_jax import Cascade, to_pil
  images = Cascade.from_workdir("runs/shapes")(["a small red circle"], output_type="pil")

The public names are exported lazily: ``import imagen_jax`` (or any one submodule) does not import
JAX, the models or the trainer until a name that needs them is used.
"""

from __future__ import annotations

import importlib
import os

# transformers logs an advisory at import when torch is absent ("PyTorch was not found. Models won't
# be available..."): the runtime install has no torch by design (only tokenizers are used), so the
# advisory is noise in every run. setdefault: a user who sets the variable keeps their choice.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

__version__ = "0.1.0"

_EXPORTS = {
  "Cascade": "imagen_jax.sample.cascade",
  "to_pil": "imagen_jax.sample.cascade",
  "PromptToPrompt": "imagen_jax.edit",
  "prompt_to_prompt": "imagen_jax.edit",
  "T5Encoder": "imagen_jax.text",
  "load_config": "imagen_jax.config",
  "train_and_evaluate": "imagen_jax.train",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
  if name in _EXPORTS:
    return getattr(importlib.import_module(_EXPORTS[name]), name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
  return sorted([*globals(), *_EXPORTS])
