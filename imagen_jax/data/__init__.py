"""Datasets for training and evaluating Imagen cascades (procedural, download-free sources).

The training pipeline's public names are exported lazily, so ``import imagen_jax.data.shapes``
does not pay for importing Grain and tensorflow-datasets.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
  "COUNTER_KEYS": "imagen_jax.data.pipeline",
  "DataConfig": "imagen_jax.data.pipeline",
  "make_dataset": "imagen_jax.data.pipeline",
  "make_map_dataset": "imagen_jax.data.pipeline",
  "BAD_REASONS": "imagen_jax.data.preprocess",
  "BadExample": "imagen_jax.data.preprocess",
  "ImageFolderSource": "imagen_jax.data.sources",
  "ManifestSource": "imagen_jax.data.sources",
  "TfdsSource": "imagen_jax.data.sources",
  "lookup_text_embeddings": "imagen_jax.data.sources",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
  if name in _EXPORTS:
    return getattr(importlib.import_module(_EXPORTS[name]), name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
