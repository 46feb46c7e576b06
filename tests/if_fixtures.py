"""Tiny random DeepFloyd IF checkpoints in IF's diffusers pipeline layout (torch + diffusers)."""

from __future__ import annotations

from pathlib import Path

try:
  from tests import t5_fixtures
  from tests.torch_oracles import declare_torchvision_ops
except ImportError:  # pragma: no cover
  import t5_fixtures
  from torch_oracles import declare_torchvision_ops

declare_torchvision_ops()

import diffusers  # noqa: E402
import torch  # noqa: E402

from imagen_jax.models.if_unet import IFUNetConfig  # noqa: E402

IF_SCHEDULER = dict(
  beta_schedule="squaredcos_cap_v2", variance_type="learned_range", prediction_type="epsilon",
  thresholding=True, dynamic_thresholding_ratio=0.95, sample_max_value=1.5,
)  # fmt: skip


def tiny_unet(preset: str, seed: int, **overrides) -> diffusers.UNet2DConditionModel:
  """A diffusers IF U-Net of our ``tiny``/``tiny_sr`` preset with every weight random (zero-init
  output layers would hide mistakes)."""
  cfg = {**IFUNetConfig.from_preset(preset).to_diffusers(), **overrides}
  torch.manual_seed(seed)
  model = diffusers.UNet2DConditionModel(**cfg).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return model


def make_if_dir(
  path: str | Path,
  preset: str = "tiny",
  *,
  seed: int = 0,
  sample_size: int = 16,
  text: bool = True,
  **unet_overrides,
) -> Path:
  """Writes ``unet/`` + ``scheduler/`` (+ stage I's sharded ``text_encoder/`` and ``tokenizer/``
  with ``text``), the layout of ``DeepFloyd/IF-I-XL-v1.0``. The U-Net reads the tiny T5's width;
  ``unet_overrides`` change its diffusers config."""
  path = Path(path)
  if text:
    t5_fixtures.make_tiny_t5_dir(path / "text_encoder", sharded=True, with_tokenizer=False)
    t5_fixtures.make_tiny_tokenizer_dir(path / "tokenizer")
  width = t5_fixtures.tiny_hf_config().d_model
  unet = tiny_unet(preset, seed, encoder_hid_dim=width, sample_size=sample_size, **unet_overrides)
  unet.save_pretrained(path / "unet")
  diffusers.DDPMScheduler(**IF_SCHEDULER).save_pretrained(path / "scheduler")
  return path
