"""Backend-aware kernel choices: which implementation of attention, GroupNorm, dynamic
thresholding's percentile and stacked block runs runs on which backend.

Each of these ops has a version of our own, written because it was faster on a 2-core CPU
(``bench/RESULTS.md``), and a library op that XLA's GPU/TPU backends or cuDNN are tuned for. A
config field (``UNetConfig.attention_impl`` / ``norm_impl``, the same on ``IFUNetConfig``) or a
keyword (``guidance.abs_percentile(..., impl=)``) forces one; ``"auto"``, the default, resolves by
``jax.default_backend()`` at trace time::

  kind         choices                  cpu       gpu                 tpu
  attention    xla | jax_xla | cudnn    xla       cudnn (else xla)    xla
  norm         ours | flax              ours      flax                flax
  percentile   bisect | sort            bisect    sort                sort
  block_runs   loop | unrolled          unrolled  loop                loop

* attention: ``xla`` is our heads-major einsums (``layers._xla_attention``; jax's own XLA version
  has a ~2× slower gradient on CPU), ``jax_xla`` is ``jax.nn.dot_product_attention(
  implementation="xla")``, ``cudnn`` the cuDNN fused (flash) kernel through the same function.
  cuDNN takes float16/bfloat16 only, head dims that are multiples of 8 up to 128 (256 from Hopper,
  compute capability 9.0), and even sequence lengths when a mask or bias is applied
  (:func:`cudnn_attention_unsupported`); under ``"auto"`` a layer cuDNN cannot take runs ``xla``,
  an explicit ``"cudnn"`` raises instead, so a benchmark never times a silent fallback. TPU: XLA's
  attention; a Pallas splash-attention kernel is a later option.
* norm: ``ours`` is ``layers.GroupNorm``'s per-channel statistics (3× faster norm + SiLU on CPU),
  ``flax`` is ``nnx.GroupNorm``'s own computation; same parameters, same outputs to 1e-5.
* percentile: ``bisect`` is ``guidance.abs_percentile``'s sort-free bisection on the float bit
  patterns (30× faster on CPU), ``sort`` is ``jnp.percentile``; the same numbers.
* block_runs: how a stacked run of U-Net blocks (``UNetConfig.scan_blocks``, ``scan_impl``) is
  applied. ``loop`` is a ``lax.scan`` loop (one compiled block per run); ``unrolled`` is the same
  scan with ``unroll=True`` (N copies of the block, as in an unstacked model). XLA's CPU backend
  takes a slow path for a convolution's weight gradient inside a loop (5-13× slower,
  ``bench/scan_blocks.py``), so CPUs unroll; the stacked layout still gives the optimizer one leaf
  per weight of a run.

The GPU/TPU choices for norm, percentile and block runs are **unmeasured** (no accelerator was
available when they were written): they pick the library op (and the loop) on the assumption that
XLA's GPU/TPU backends handle it well. ``bench/gpu/gpu_bench.py`` times the attention, norm and
percentile pairs on the device so that this table can be confirmed or changed. A backend that is
none of cpu/gpu/tpu gets the CPU column (portable code).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

AUTO = "auto"
BACKENDS = ("cpu", "gpu", "tpu")
# Concrete implementations of each kind (``AUTO`` is accepted on top of these).
CHOICES: dict[str, tuple[str, ...]] = {
  "attention": ("xla", "jax_xla", "cudnn"),
  "norm": ("ours", "flax"),
  "percentile": ("bisect", "sort"),
  "block_runs": ("loop", "unrolled"),
}
# What ``AUTO`` means per backend (see the module docstring for why, and what is measured).
AUTO_CHOICE: dict[str, dict[str, str]] = {
  "attention": {"cpu": "xla", "gpu": "cudnn", "tpu": "xla"},
  "norm": {"cpu": "ours", "gpu": "flax", "tpu": "flax"},
  "percentile": {"cpu": "bisect", "gpu": "sort", "tpu": "sort"},
  "block_runs": {"cpu": "unrolled", "gpu": "loop", "tpu": "loop"},
}
# jax.default_backend() names GPUs "gpu"; platform names that may be passed in as well.
_ALIASES = {"cuda": "gpu", "rocm": "gpu"}
_CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def allowed(kind: str) -> tuple[str, ...]:
  """The values a field choosing ``kind`` accepts: ``"auto"`` and the concrete choices."""
  if kind not in CHOICES:
    raise ValueError(f"unknown kernel kind {kind!r}; known kinds: {', '.join(CHOICES)}")
  return (AUTO, *CHOICES[kind])


def check_choice(kind: str, choice: str, field: str) -> None:
  """Raises ``ValueError`` naming ``field`` when ``choice`` is not a value ``kind`` accepts."""
  values = allowed(kind)
  if choice not in values:
    raise ValueError(f"{field} must be one of {values}, got {choice!r}")


def backend_name(backend: str | None = None) -> str:
  """``backend`` (default ``jax.default_backend()``) as ``"cpu"``, ``"gpu"``, ``"tpu"`` or other."""
  name = (backend or jax.default_backend()).lower()
  return _ALIASES.get(name, name)


def resolve(
  kind: str, choice: str = AUTO, *, backend: str | None = None, field: str | None = None
) -> str:
  """The concrete implementation of ``kind`` that ``choice`` means on ``backend``.

  Args:
    kind: ``"attention"``, ``"norm"`` or ``"percentile"``.
    choice: ``"auto"`` or one of ``CHOICES[kind]`` (returned as is).
    backend: ``"cpu"``, ``"gpu"``, ``"tpu"`` (``"cuda"``/``"rocm"`` mean ``"gpu"``); default
      ``jax.default_backend()``. Other backends get the CPU choice.
    field: the name to put in the error message (default ``f"{kind} impl"``).

  Returns:
    One of ``CHOICES[kind]``. For attention, ``"cudnn"`` still depends on the layer's shapes and
    dtype (:func:`cudnn_attention_unsupported`); ``layers.attention`` applies that check.

  Raises:
    ValueError: an unknown ``kind`` or ``choice``.
  """
  check_choice(kind, choice, field or f"{kind} impl")
  if choice != AUTO:
    return choice
  table = AUTO_CHOICE[kind]
  return table.get(backend_name(backend), table["cpu"])


def _compute_capability() -> tuple[int, int] | None:
  """(major, minor) of the first device's CUDA compute capability, or None when it has none."""
  cc = getattr(jax.devices()[0], "compute_capability", None)
  try:
    major, minor = str(cc).split(".")[:2]
    return int(major), int(minor)
  except ValueError:
    return None


def cudnn_attention_unsupported(
  dtype: jnp.dtype,
  head_dim: int,
  seq_q: int,
  seq_kv: int,
  masked: bool,
  *,
  backend: str | None = None,
  capability: tuple[int, int] | None = None,
) -> str | None:
  """Why cuDNN's fused attention cannot run this layer, or None when it can.

  The conditions are jax's own checks (``jax._src.cudnn.fused_attention_stablehlo``
  ``check_layout`` / ``check_is_flash_attention``, jax 0.10): float16/bfloat16 inputs, a head dim
  that is a multiple of 8 and at most 128 (256 from compute capability 9.0, Hopper), and even query
  and key lengths when a bias or mask is applied (checked by jax for training; required here for
  inference too, so that one model takes one path).

  Args:
    dtype: the dtype of q, k and v.
    head_dim: channels per head.
    seq_q: query length T.
    seq_kv: key/value length S.
    masked: whether a mask or bias is applied.
    backend: as :func:`resolve` (default: the current backend).
    capability: the GPU's compute capability (default: read from the first device).
  """
  name = backend_name(backend)
  if name != "gpu":
    return f"the backend is {name!r}; cuDNN attention needs a CUDA GPU"
  if jnp.dtype(dtype) not in _CUDNN_DTYPES:
    return f"dtype {jnp.dtype(dtype).name}: cuDNN attention takes float16/bfloat16 (set dtype)"
  if capability is None:
    capability = _compute_capability()
    if capability is None:
      return "the device reports no CUDA compute capability"
  max_dim = 256 if capability >= (9, 0) else 128
  if head_dim % 8 or head_dim > max_dim:
    return f"head dim {head_dim}: cuDNN takes multiples of 8 up to {max_dim} on this GPU"
  if masked and (seq_q % 2 or seq_kv % 2):
    return f"sequence lengths {seq_q} x {seq_kv}: cuDNN needs even lengths with a mask or bias"
  return None
