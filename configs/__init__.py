"""The built-in run configs, by name: ``--config=shapes:ci``, ``base64``, ``sr256``, ``sr1024``.

Each module's ``get_config(arg)`` returns a run config (:mod:`imagen_jax.config`). This directory
ships in the wheel as the package ``imagen_jax.configs``; :func:`imagen_jax.config.load_config`
finds a config here by name, so ``imagen-jax-train --config=shapes:ci`` works from any directory.
"""
