"""Training: configs, the train step, and ``train_and_evaluate`` (the loop over cascade stages)."""

from imagen_jax.train.trainer import NonFiniteError, train_and_evaluate

__all__ = ["NonFiniteError", "train_and_evaluate"]
