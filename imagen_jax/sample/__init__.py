"""Sampling: per-stage samplers with classifier-free guidance, and the cascade pipeline."""

from imagen_jax.sample.stage import SamplerSettings, make_stage_sampler

__all__ = ["SamplerSettings", "make_stage_sampler"]
