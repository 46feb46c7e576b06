"""Command-line tools (`python -m imagen_jax.tools.<name>`)."""
