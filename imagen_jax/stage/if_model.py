"""A DeepFloyd IF U-Net as a cascade stage: the same pure ``apply`` as :class:`StageModel`.

IF's U-Nets read a discrete timestep τ, predict ε and a learned-range variance (6 channels), and
its stage II reads the upscaled low-res image concatenated to x_t plus the augmentation level as
a class label. :class:`IFStageModel` maps our interface onto that:

* the log-SNR a sampler passes → τ through the stage's :class:`DiscreteSchedule` (t = (τ+1)/N);
* ``lowres`` arrives already upscaled to the stage's size (:meth:`IFStageModel.prepare_lowres`,
  bilinear with ``align_corners=True`` as IF's pipeline does) and noise-augmented at that size
  (IF noises the upscaled image); ``aug_logsnr`` → the class label τ_aug;
* the text mask: IF's pipelines do not pass one (every one of the 77 tokens, padding included,
  is attended); ``use_text_mask=True`` passes it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from imagen_jax.diffusion.discrete import DiscreteSchedule
from imagen_jax.models.if_unet import IFUNet, IFUNetConfig
from imagen_jax.stage.pure import PureModel


def upsample_align_corners(images: Any, size: int) -> Any:
  """``[N, h, w, C]`` → ``[N, size, size, C]``: bilinear with ``align_corners=True`` (what IF's
  super-resolution pipeline applies to the stage-I image: ``F.interpolate``). A JAX array (also
  inside ``jit``: the train step) stays one; anything else becomes a NumPy array."""
  xp = jnp if isinstance(images, jax.Array) else np
  x = xp.asarray(images, xp.float32)

  def weights(n_in: int) -> np.ndarray:  # [size, n_in]: output row ← two input rows
    if n_in == 1:
      return np.ones((size, 1), np.float32)
    pos = np.arange(size, dtype=np.float64) * ((n_in - 1) / max(size - 1, 1))
    lo = np.minimum(np.floor(pos).astype(int), n_in - 2)
    frac = pos - lo
    w = np.zeros((size, n_in), np.float64)
    w[np.arange(size), lo] = 1.0 - frac
    w[np.arange(size), lo + 1] += frac
    return w.astype(np.float32)

  wh, ww = weights(x.shape[1]), weights(x.shape[2])
  return xp.einsum("oh,nhwc,pw->nopc", wh, x, ww).astype(xp.float32)


@dataclasses.dataclass(frozen=True)
class IFStageModel(PureModel):
  """The static half of an IF U-Net stage (config + graph) with pure ``init_params`` / ``apply``.

  Attributes:
    config: the U-Net architecture.
    graphdef: its NNX graph definition.
    abstract_state: its ``nnx.State`` of shapes (the template params are merged into).
    schedule: the discrete schedule the U-Net was trained on (maps log-SNR → τ).
    use_text_mask: pass the text mask to the U-Net (IF's pipelines do not).
    seed: the random init's seed (fine-tuning from scratch only).
  """

  config: IFUNetConfig
  graphdef: Any
  abstract_state: Any
  schedule: DiscreteSchedule
  use_text_mask: bool = False
  seed: int = 0

  @classmethod
  def create(
    cls,
    config: IFUNetConfig,
    *,
    schedule: DiscreteSchedule | None = None,
    use_text_mask: bool = False,
    seed: int = 0,
  ) -> IFStageModel:
    abstract = nnx.eval_shape(lambda: IFUNet(config, rngs=nnx.Rngs(seed)))
    graphdef, abstract_state = nnx.split(abstract)
    return cls(
      config, graphdef, abstract_state, schedule or DiscreteSchedule(), use_text_mask, seed
    )

  @property
  def is_super_resolution(self) -> bool:
    """Stage II reads x_t and the upscaled low-res image: ``in_channels`` = 2 × image channels."""
    return self.config.in_channels == self.config.out_channels

  @property
  def learned_variance(self) -> bool:
    """6 output channels for 3 image channels: ε and the learned-range variance."""
    return self.config.out_channels == 2 * self.image_channels

  @property
  def image_channels(self) -> int:
    cfg = self.config
    return cfg.in_channels // 2 if self.is_super_resolution else cfg.in_channels

  def init_params(self) -> dict:
    """Random initial params as a pure dict (call inside ``jax.jit``)."""
    return nnx.to_pure_dict(nnx.state(IFUNet(self.config, rngs=nnx.Rngs(self.seed))))

  def prepare_lowres(self, lowres: Any, size: int) -> Any:
    """The previous stage's images → this stage's low-res input: upscaled to ``size`` first
    (IF noise-augments the upscaled image)."""
    return upsample_align_corners(lowres, size)

  def timestep(self, logsnr: jax.Array) -> jax.Array:
    """The discrete timestep τ the U-Net reads for a noise level λ."""
    return self.schedule.timestep(self.schedule.t_from_logsnr(logsnr))

  def apply(
    self,
    params: dict,
    x: jax.Array,
    logsnr: jax.Array,
    text_emb: jax.Array,
    text_mask: jax.Array,
    *,
    controller: Any = None,
    lowres: jax.Array | None = None,
    aug_logsnr: jax.Array | None = None,
  ) -> jax.Array:
    """The U-Net as a pure function of ``params``, in the cascade's terms.

    Args:
      params: the U-Net's pure params dict.
      x: ``[B, H, W, 3]`` x_t.
      logsnr: ``[B]`` its log-SNR.
      text_emb: ``[B, L, D]`` T5 hidden states.
      text_mask: ``[B, L]`` (used only with ``use_text_mask``).
      controller: an attention controller (prompt-to-prompt, attention maps).
      lowres: stage II: ``[B, H, W, 3]`` the upscaled, noise-augmented low-res image.
      aug_logsnr: stage II: ``[B]`` its augmentation log-SNR.

    Returns:
      ``[B, H, W, out_channels]``: ε then the learned-range variance; with a controller,
      ``(out, controller.outputs())``.
    """
    if self.is_super_resolution != (lowres is not None):
      raise ValueError(
        "IF stage II needs lowres and aug_logsnr; stage I takes neither"
        if self.is_super_resolution
        else "this IF stage is not super-resolution: it takes no lowres input"
      )
    model = self.merge(params)
    tau = self.timestep(logsnr)  # [B]
    labels = None
    if lowres is not None:
      x = jnp.concatenate([x, lowres.astype(x.dtype)], axis=-1)  # [B, H, W, 6]
      labels = self.timestep(aug_logsnr)  # [B]
    mask = text_mask if self.use_text_mask else None
    return model(x, tau, text_emb, mask, class_labels=labels, controller=controller)
