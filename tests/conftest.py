"""Test-session setup: a persistent XLA compilation cache shared by all tests in the session.

Many tests build the same tiny models; with the cache an identical program compiles once.
"""

from __future__ import annotations

import os
import tempfile

import jax

_CACHE = os.environ.get("IMAGEN_JAX_TEST_CACHE") or tempfile.mkdtemp(prefix="imagen_jax_xla_")
os.environ["IMAGEN_JAX_TEST_CACHE"] = _CACHE  # subprocesses started by tests reuse it
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
