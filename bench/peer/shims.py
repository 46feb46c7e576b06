"""The two import shims imagen-pytorch 2.1.0 needs on a CPU-only, offline machine.

Call :func:`apply` before ``import imagen_pytorch`` (see shared/reference/env-notes.md §8):

1. torchvision 0.28.0 from PyPI is a CUDA build; with CPU torch its import fails with
   ``RuntimeError: operator torchvision::nms does not exist``. Defining the two op schemas lets the
   Python side import (the C ops stay unavailable; imagen-pytorch does not use them).
2. imagen_pytorch's configs call ``T5Config.from_pretrained("google/t5-v1_1-base")`` at import
   time, which needs the Hugging Face Hub. We return the same config offline (only ``d_model`` is
   read); text embeddings are always passed directly, so no T5 weights are ever needed.
"""

from __future__ import annotations

import os

_applied = False


def apply() -> None:
  """Installs both shims (idempotent) and forces the Hugging Face Hub offline."""
  global _applied
  if _applied:
    return
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  import torch
  import transformers

  lib = torch.library.Library("torchvision", "DEF")
  lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
  lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
  # Keep the Library object alive: the schema is removed when it is garbage collected.
  globals()["_tv_lib"] = lib

  orig = transformers.T5Config.from_pretrained

  def offline_t5_config(name, *args, **kwargs):
    if name == "google/t5-v1_1-base":
      return transformers.T5Config(d_model=768)
    return orig(name, *args, **kwargs)

  transformers.T5Config.from_pretrained = offline_t5_config
  _applied = True
