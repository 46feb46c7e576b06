"""Importing the PyTorch metric oracles (pytorch-fid, torchmetrics) on CI's CPU torch.

torchvision 0.28.0 from PyPI (pulled in by pytorch-fid and torchmetrics' multimodal metrics) is a
CUDA build; with the CPU torch that CI pins its import fails with ``RuntimeError: operator
torchvision::nms does not exist``. Declaring the two C ops' schemas first lets the import go
through; the oracles never call those ops (they use only ``torchvision.models`` and transforms).
"""

from __future__ import annotations

import functools

import pytest


@functools.cache
def declare_torchvision_ops() -> None:
  """Makes ``import torchvision`` work on CPU torch (once per process); skips without torch."""
  torch = pytest.importorskip("torch")
  try:
    import torchvision  # noqa: F401  (a CPU build imports as it is)
  except RuntimeError:
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    declare_torchvision_ops.lib = lib  # keep the registration alive


def pytorch_fid_inception():
  """The ``pytorch_fid.inception`` module (test extra)."""
  declare_torchvision_ops()
  return pytest.importorskip("pytorch_fid.inception")


def pytorch_fid_score():
  """The ``pytorch_fid.fid_score`` module (test extra)."""
  declare_torchvision_ops()
  return pytest.importorskip("pytorch_fid.fid_score")


def torchmetrics_multimodal():
  """``torchmetrics.functional.multimodal`` (CLIP score; test extra)."""
  declare_torchvision_ops()
  return pytest.importorskip("torchmetrics.functional.multimodal")


def torchmetrics_image():
  """``torchmetrics.image`` (KID; test extra)."""
  declare_torchvision_ops()
  return pytest.importorskip("torchmetrics.image")
