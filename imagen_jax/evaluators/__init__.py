"""Scoring generated images: one evaluator interface (:mod:`~imagen_jax.evaluators.registry`)
chosen by ``config.evals``, run by the trainer on EMA weights and by ``python -m
imagen_jax.evaluators`` on folders.

* :mod:`~imagen_jax.evaluators.shapes`: prompt alignment on the ``shapes`` demo data (pixels);
* :mod:`~imagen_jax.evaluators.clip_score`: CLIP score (torchmetrics' definition);
* :mod:`~imagen_jax.evaluators.fid`: FID / KID with pytorch-fid's Inception, in JAX;
* :mod:`~imagen_jax.evaluators.drawbench`: a DrawBench-style runner (per-category grids and CLIP
  scores, two runs side by side).
"""
