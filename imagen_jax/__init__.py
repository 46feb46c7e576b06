"""imagen-jax: Imagen text-to-image diffusion cascades in JAX and Flax NNX."""

__version__ = "0.1.0"
