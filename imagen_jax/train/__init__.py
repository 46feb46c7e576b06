"""Training: ``train_and_evaluate`` (the loop over cascade stages) and its data iterators."""

from imagen_jax.train.trainer import NonFiniteError, train_and_evaluate

__all__ = ["NonFiniteError", "train_and_evaluate"]
