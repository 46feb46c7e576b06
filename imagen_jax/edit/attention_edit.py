"""Prompt-to-prompt editing (Hertz et al. 2022, "Prompt-to-Prompt Image Editing with Cross-Attention
Control", run on Imagen): edit a generated image by editing its prompt.

One batch holds the source prompt (row 0) and K edited prompts (rows 1..K). They start from the
same noise and share every later noise draw; while they are sampled, the source's attention
probabilities are injected into the edits' (§3.2):

* cross attention (the probabilities on the text tokens), for the steps in ``cross_replace``:
  ``M_edit ← (M_src · matrix) ⊙ a + M_edit ⊙ (1 − a)``, times the token ``weights``
  (:mod:`imagen_jax.edit.tokens`: word swap, refinement, reweighting);
* self attention (the probabilities on the image pixels), for the steps in ``self_replace``
  and in layers of at most ``self_max_res``² pixels;
* local blending: after every step from ``blend_start`` on, the edit's pixels outside a mask made
  from the chosen words' maps are taken from the source (§3.3, "Local editing").

**What "cross" and "self" mean in Imagen's layers.** Imagen concatenates the text keys/values to
the self-attention keys (§2.5), so one softmax covers [image pixels | text tokens]: its text
columns are the cross-attention map, its image columns the self-attention map, and each row sums
to 1. An edit of the text columns rescales the image columns of the same row by
(1 − m_new) / (1 − m_old), m = the row's text mass, so every row stays a distribution (when a
reweighting pushes m_new above 1, the image columns become 0 and the row sums to m_new, like the
paper's reweighted cross-attention). Self replacement gives the edit the source's image columns
rescaled to the edit's own text mass. In text-only cross-attention layers (the 1024² model) there
is only the cross part.

**Batch layout under classifier-free guidance.** The U-Net sees ``[cond; uncond]`` (2B rows):
edits act on the conditional half only (as in the paper); the unconditional half runs untouched.

Everything that depends on the prompts (token mappings, weights, per-step schedules) is data, so
different prompts of the same length never recompile; the settings that change the program
(which layers, map resolution, whether self replacement or local blending is on) are static.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from imagen_jax.edit import tokens as tok
from imagen_jax.models.attention_control import AttentionController

MODES = ("replace", "refine", "reweight")
Fraction = float | tuple[float, float]

_TINY = 1e-30  # below this a row has no image mass to rescale


@dataclasses.dataclass(frozen=True)
class PromptToPrompt:
  """What to edit and how (the paper's knobs).

  Attributes:
    mode: ``replace`` (word swap, same number of words), ``refine`` (words added or removed;
      shared tokens aligned) or ``reweight`` (scale chosen words' attention; the prompts may
      also differ as in ``refine``).
    cross_replace: fraction of the steps (from the first, noisiest) during which the edits take
      the source's cross-attention maps, or a ``(start, end)`` pair; the paper's τ_c.
    cross_replace_words: per-word overrides of ``cross_replace`` (words of the edited prompts).
    self_replace: fraction (or pair) of steps with the source's self-attention injected; τ_s.
    reweight: ``{word: scale}`` applied to the edited prompts' attention where they contain the
      word (any mode; negative or below-1 scales weaken a word).
    local_blend: words whose maps confine the edit (each prompt uses those of them it contains:
      ``("red", "blue")`` for "a red …" → "a blue …"); ``None`` edits the whole image.
    blend_threshold: a pixel is edited where the words' normalised map exceeds this.
    blend_start: fraction of the steps after which local blending starts.
    stages: the cascade stages that get the edit (default: every stage); the others still
      sample source and edits with shared noise.
    map_res: the resolution the attention maps are aggregated at (and the blend mask is made
      from), clamped to each stage's image size.
    self_max_res: self replacement only in layers of at most this many pixels per side.
  """

  mode: str = "replace"
  cross_replace: Fraction = 0.8
  cross_replace_words: Mapping[str, Fraction] | None = None
  self_replace: Fraction = 0.4
  reweight: Mapping[str, float] | None = None
  local_blend: Sequence[str] | None = None
  blend_threshold: float = 0.3
  blend_start: float = 0.2
  stages: Sequence[str] | None = None
  map_res: int = 16
  self_max_res: int = 32

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"mode={self.mode!r}; choose one of {MODES}")
    if self.mode == "reweight" and not self.reweight:
      raise ValueError("mode='reweight' needs reweight={word: scale}, e.g. {'large': 2.0}")
    for name in ("cross_replace", "self_replace"):
      tok.step_schedule(10, getattr(self, name), name)  # validates the fraction
    if not 0.0 <= self.blend_start <= 1.0:
      raise ValueError(f"blend_start must be in [0, 1], got {self.blend_start}")
    if not 0.0 <= self.blend_threshold < 1.0:
      raise ValueError(f"blend_threshold must be in [0, 1), got {self.blend_threshold}")
    if int(self.map_res) < 1 or int(self.self_max_res) < 1:
      raise ValueError("map_res and self_max_res must be >= 1")

  def as_dict(self) -> dict[str, Any]:
    """JSON-friendly settings (for ``metadata.json``)."""
    out = dataclasses.asdict(self)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in out.items()}


# ------------------------------------------------------------------------------------------------
# The static per-stage control (hashable: it keys the compiled sampler) and its controller.


@dataclasses.dataclass(frozen=True)
class StageEdit:
  """The program-shaping part of an edit at one stage (see ``sample.stage.make_stage_sampler``)."""

  edits: bool  # False: sample with shared noise, read nothing (zero cost)
  record: bool  # aggregate attention maps
  self_replace: bool
  self_max_res: int
  map_res: int
  local_blend: bool
  blend_threshold: float

  def init_state(self, data: dict, batch: int) -> dict:
    length = data["weights"].shape[-1]
    zeros = jnp.zeros((batch, self.map_res, self.map_res, length), jnp.float32)
    return {"maps": zeros, "step_maps": zeros, "count": jnp.zeros((), jnp.float32)}

  def controller(self, step: jax.Array, state: dict, data: dict, *, cond_batch: int):
    return _EditController(self, step, state, data, cond_batch)

  def after_step(self, step: jax.Array, x: jax.Array, state: dict, data: dict) -> jax.Array:
    """Local blending (§3.3): outside the words' mask, the edits take the source's pixels."""
    if not self.local_blend:
      return x
    b, hgt, wid = x.shape[:3]
    m = jnp.einsum("bhwl,bl->bhw", state["step_maps"], data["blend_tokens"])  # [B, r, r]
    # Dilate (3x3 max pool), upsample to the image and normalise per image, as the paper's code.
    m = jax.lax.reduce_window(m, -jnp.inf, jax.lax.max, (1, 3, 3), (1, 1, 1), "SAME")
    m = jax.image.resize(m, (b, hgt, wid), "linear")
    m = m / jnp.maximum(m.max(axis=(1, 2), keepdims=True), 1e-12)
    mask = m > self.blend_threshold
    mask = mask | mask[:1]  # the union of the source's and the edit's regions
    blended = jnp.where(mask[..., None], x, x[:1])  # selection, not arithmetic: exact pixels
    on = (data["blend"][step] > 0) & (jnp.arange(b) > 0)  # [B]: never row 0 (the source)
    return jnp.where(on[:, None, None, None], blended, x)


class _EditController(AttentionController):
  """Traced per model call: edits the conditional half of the batch and aggregates its maps."""

  def __init__(self, spec: StageEdit, step, state, data, cond_batch: int):
    self.spec, self.step, self.state, self.data = spec, step, state, data
    self.cond_batch = int(cond_batch)
    self.step_maps = jnp.zeros_like(state["step_maps"])
    self.n_sites = 0

  def wants(self, site: str) -> bool:
    del site
    return self.spec.edits or self.spec.record

  def edit(self, site, image_probs, text_probs, *, hw):
    del site
    b = self.cond_batch
    cond = text_probs[:b]  # [B, N, HW, L]: the conditional rows, source first
    if self.spec.record:
      self._record(cond, hw)
    if not self.spec.edits:
      return image_probs, text_probs
    d, i = self.data, self.step
    src = cond[:1]
    # HIGHEST: an identity mapping must reproduce the source's maps exactly on every backend.
    mapped = jnp.einsum("xnql,bls->bnqs", src, d["matrix"], precision=jax.lax.Precision.HIGHEST)
    a = d["has_source"][:, None, None, :]  # [B, 1, 1, L]
    replaced = (mapped * a + cond * (1.0 - a)) * d["weights"][:, None, None, :]
    c = d["cross"][i][:, None, None, :]  # [B, 1, 1, L]: this step's cross-replace alphas
    new = replaced * c + cond * (1.0 - c)
    new_text = jnp.concatenate([new, text_probs[b:]], axis=0)
    if image_probs is None:
      return None, new_text
    img = image_probs[:b]  # [B, N, HW, HW]
    # Rescale a row's image columns only where its text columns changed, and take the source's
    # where they equal the source's: exact comparisons, so that unchanged rows (and edits equal
    # to the source) keep their pixels bit for bit whatever order XLA sums the masses in.
    # A row's image mass is summed from its own columns: 1 − (text mass) cancels catastrophically
    # for rows that attend (almost) only to text, and rescaling by it overflowed to inf / NaN.
    m_new = new.sum(-1, keepdims=True)  # [B, N, HW, 1]
    keep = jnp.maximum(1.0 - m_new, 0.0)  # the row's image mass after the text edit
    mass = img.sum(-1, keepdims=True)
    unchanged = jnp.all(new == cond, axis=-1, keepdims=True)
    # Every entry is <= its row's mass, so img * keep / mass <= keep: never overflows.
    ratio = jnp.where(unchanged, 1.0, keep / jnp.maximum(mass, _TINY))
    new_img = img * ratio
    # A row without image mass cannot take the kept mass: its text columns are renormalised.
    dead = ~unchanged & (mass <= _TINY)
    new = jnp.where(dead, new / jnp.maximum(m_new, _TINY), new)
    new_text = jnp.concatenate([new, text_probs[b:]], axis=0)
    if self.spec.self_replace and hw[0] * hw[1] <= self.spec.self_max_res**2:
      like_src = jnp.all(new == src, axis=-1, keepdims=True)
      src_mass = img[:1].sum(-1, keepdims=True)
      src_ratio = jnp.where(like_src, 1.0, keep / jnp.maximum(src_mass, _TINY))
      # Where the source row has no image mass, the edit keeps its own rescaled columns.
      from_src = jnp.where(src_mass <= _TINY, new_img, img[:1] * src_ratio)
      s = d["self"][i][:, None, None, None]  # [B, 1, 1, 1]
      new_img = from_src * s + new_img * (1.0 - s)
    return jnp.concatenate([new_img, image_probs[b:]], axis=0), new_text

  def _record(self, cond: jax.Array, hw: tuple[int, int]) -> None:
    b, _, _, length = cond.shape
    r = self.spec.map_res
    maps = cond.mean(axis=1).reshape(b, hw[0], hw[1], length)  # [B, h, w, L], heads averaged
    if hw != (r, r):
      maps = jax.image.resize(maps, (b, r, r, length), "linear", antialias=True)
    self.step_maps = self.step_maps + maps
    self.n_sites += 1

  def outputs(self) -> dict:
    step_maps = self.step_maps / max(self.n_sites, 1)  # mean over layers
    return {
      "maps": self.state["maps"] + step_maps,  # summed over steps
      "step_maps": step_maps,
      "count": self.state["count"] + 1.0,
    }


# ------------------------------------------------------------------------------------------------
# Host side: prompts → per-stage data.


@dataclasses.dataclass
class EditPlan:
  """An edit of one source prompt into K targets, ready for the cascade (``Cascade.generate``).

  Built by :func:`plan_edit`; ``for_stage`` gives each stage its static control and data.
  """

  edit: PromptToPrompt
  prompts: list[str]
  tokens: list[tok.TokenizedPrompt]
  matrix: np.ndarray  # [1+K, L, L]
  has_source: np.ndarray  # [1+K, L]
  weights: np.ndarray  # [1+K, L]
  blend_tokens: np.ndarray  # [1+K, L]
  record: bool = True

  def for_stage(self, stage: Any, settings: Any, batch: int) -> tuple[StageEdit, dict]:
    """``(static control, data)`` for ``stage`` sampled with ``settings`` at ``batch`` rows."""
    e, steps = self.edit, int(settings.steps)
    edited = e.stages is None or stage.name in e.stages
    n = len(self.prompts)
    cross = np.stack(
      [
        tok.word_step_alphas(t, steps, e.cross_replace, e.cross_replace_words)
        for t in self.tokens[1:]
      ],
      axis=1,
    )  # [steps, K, L]
    cross = np.concatenate([np.zeros_like(cross[:, :1]), cross], axis=1)  # row 0: the source
    self_steps = tok.step_schedule(steps, e.self_replace, "self_replace")  # [steps]
    self_rows = np.repeat(self_steps[:, None], n, axis=1)
    self_rows[:, 0] = 0.0
    blend = (np.arange(steps) >= int(e.blend_start * steps)).astype(np.float32)

    def rows(x, axis=0):  # pad the prompt rows to the compiled batch (repeat the last edit)
      reps = batch - n
      if reps <= 0:
        return x
      last = np.take(x, [n - 1], axis=axis)
      return np.concatenate([x, np.repeat(last, reps, axis=axis)], axis=axis)

    data = {
      "matrix": rows(self.matrix),
      "has_source": rows(self.has_source),
      "weights": rows(self.weights),
      "cross": rows(cross, axis=1),
      "self": rows(self_rows, axis=1),
      "blend_tokens": rows(self.blend_tokens),
      "blend": blend,
    }
    spec = StageEdit(
      edits=edited,
      record=self.record and edited,
      self_replace=edited and float(self_steps.sum()) > 0,
      self_max_res=int(e.self_max_res),
      map_res=min(int(e.map_res), int(stage.image_size)),
      local_blend=edited and bool(e.local_blend),
      blend_threshold=float(e.blend_threshold),
    )
    return spec, jax.tree.map(jnp.asarray, data)


def plan_edit(
  tokenizer: Any, source: str, targets: Sequence[str], edit: PromptToPrompt
) -> EditPlan:
  """Tokenizes the prompts and builds the token mappings of ``edit`` (checked here, on the host).

  Args:
    tokenizer: the cascade's :class:`imagen_jax.text.Tokenizer`.
    source: the source prompt.
    targets: the K edited prompts.
    edit: the settings.

  Raises:
    ValueError: no targets, a replace edit whose prompts differ in word count, or a reweight /
      blend word missing from the prompts (each message names the prompt and the words).
  """
  if isinstance(targets, str):
    targets = [targets]
  if not targets:
    raise ValueError("prompt-to-prompt needs at least one edited prompt (target_prompts)")
  prompts = [source, *targets]
  toks = [tok.tokenize_words(tokenizer, p) for p in prompts]
  length = toks[0].length
  mats, has, weights = [np.eye(length, dtype=np.float32)], [np.ones(length, np.float32)], []
  weights.append(np.ones(length, np.float32))
  for t in toks[1:]:
    if edit.mode == "replace":
      m, a = tok.replace_mapping(toks[0], t)
    else:
      m, a = tok.refine_mapping(toks[0], t)
    mats.append(m)
    has.append(a)
    present = {w: v for w, v in (edit.reweight or {}).items() if _has_word(t, w)}
    weights.append(tok.token_weights(t, present))
  for word in edit.reweight or {}:
    if not any(_has_word(t, word) for t in toks[1:]):
      raise ValueError(
        f"reweight word {word!r} is not in any edited prompt {[t.prompt for t in toks[1:]]}"
      )
  blend = np.zeros((len(prompts), length), np.float32)
  if edit.local_blend:
    for row, t in enumerate(toks):
      found = [w for w in edit.local_blend if _has_word(t, w)]
      if not found:
        raise ValueError(
          f"local_blend words {list(edit.local_blend)}: none is in the prompt {t.prompt!r}"
        )
      for w in found:
        blend[row, t.positions(w)] = 1.0
  return EditPlan(
    edit=edit,
    prompts=prompts,
    tokens=toks,
    matrix=np.stack(mats),
    has_source=np.stack(has),
    weights=np.stack(weights),
    blend_tokens=blend,
  )


def _has_word(prompt: tok.TokenizedPrompt, word: str) -> bool:
  return word.strip().lower() in (w.lower() for w in prompt.words)
