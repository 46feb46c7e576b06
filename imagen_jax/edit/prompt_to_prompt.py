"""The one-call prompt-to-prompt entry: ``prompt_to_prompt(cascade, source, targets, ...)``.

  from imagen_jax import Cascade
  from imagen_jax.edit import PromptToPrompt, prompt_to_prompt

  cascade = Cascade.from_workdir("runs/shapes")
  result = prompt_to_prompt(
    cascade, "a small red circle at the top left", ["a small blue circle at the top left"],
    edit=PromptToPrompt(mode="replace", cross_replace=0.8, self_replace=0.4),
  )
  result.images["sr"]           # [1 + K, H, W, 3]: the source, then each edit
  result.word_maps("base", 0)   # {word: [r, r]} aggregated cross-attention of the source

The edit math (controllers, token mappings, batch layout under guidance) is in
:mod:`imagen_jax.edit.attention_edit` and :mod:`imagen_jax.edit.tokens`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from imagen_jax.edit.attention_edit import EditPlan, PromptToPrompt, plan_edit
from imagen_jax.edit.attention_maps import attention_row, word_maps
from imagen_jax.edit.tokens import TokenizedPrompt
from imagen_jax.sample.cascade import Cascade, StageInputs, to_pil
from imagen_jax.sample.inversion import CascadeInversion


@dataclasses.dataclass
class EditResult:
  """Images and attention maps of one source prompt and its edits.

  Attributes:
    prompts: the source prompt, then the K edited prompts.
    images: stage name → ``[1 + K, H, W, 3]`` float32 in [-1, 1] (row 0 is the source).
    attention: stage name → ``[1 + K, r, r, L]``: each prompt's cross-attention probabilities
      per token, averaged over heads, text-attention layers and steps (edited stages only).
    tokens: the tokenized prompts (words and their token positions).
    edit: the settings used.
  """

  prompts: list[str]
  images: dict[str, np.ndarray]
  attention: dict[str, np.ndarray]
  tokens: list[TokenizedPrompt]
  edit: PromptToPrompt

  def word_maps(self, stage: str | None = None, row: int = 0) -> dict[str, np.ndarray]:
    """``{word: [r, r]}`` for prompt ``row`` (0 = source) at ``stage`` (default: the first)."""
    stage = stage or next(iter(self.attention))
    if stage not in self.attention:
      raise ValueError(f"no attention maps for stage {stage!r}; have {list(self.attention)}")
    return word_maps(self.attention[stage][row], self.tokens[row])

  def attention_rows(self, stage: str | None = None) -> list[Image.Image]:
    """One captioned row of word overlays per prompt, on that prompt's image at ``stage``."""
    stage = stage or next(iter(self.attention))
    return [
      attention_row(self.images[stage][r], self.word_maps(stage, r))
      for r in range(len(self.prompts))
    ]

  def pil(self, stage: str | None = None) -> list[Image.Image]:
    """The images of ``stage`` (default: the last) as PIL images, source first."""
    return to_pil(self.images[stage or list(self.images)[-1]])


def prompt_to_prompt(
  cascade: Cascade,
  source_prompt: str,
  target_prompts: str | Sequence[str],
  *,
  edit: PromptToPrompt | None = None,
  seed: int = 0,
  negative_prompt: str | None = None,
  settings: dict[str, dict] | None = None,
  start_stage: str | None = None,
  init_image: np.ndarray | None = None,
  strength: float | None = None,
  progress: bool = True,
  inversion: CascadeInversion | None = None,
  **edit_kwargs: Any,
) -> EditResult:
  """Samples ``source_prompt`` and its edits ``target_prompts`` together through the cascade.

  Every stage runs one compiled program for the 1 + K prompts; each SR stage upsamples each
  prompt's own (edited) low-res image. The source image is the one
  ``cascade([source_prompt], seed=seed)`` gives; an edit equal to the source prompt gives the
  source image bit for bit, and with ``cross_replace=0, self_replace=0`` (and no blending) an edit
  is plain sampling of its prompt from the source's noise.

  Args:
    cascade: the loaded cascade (its text encoder must have a tokenizer: a T5, not only an
      embedding cache).
    source_prompt: the prompt of the image to edit.
    target_prompts: the edited prompt(s).
    edit: the edit settings; or pass them as keywords (``mode="refine", cross_replace=0.6``).
    seed: the shared noise seed.
    negative_prompt: one negative prompt for every row (default: the null condition).
    settings: per-stage sampler overrides, as for ``Cascade.__call__``.
    start_stage, init_image, strength: as for ``Cascade.__call__`` (one ``init_image`` row
      per prompt).
    progress: tqdm bars.
    inversion: edit a *real* image: its inversion under ``source_prompt``
      (:func:`imagen_jax.edit.image_ops.invert`, with ``null_text=True`` for guided stages).
      Every row starts from the inverted latents, with the source's per-step null conditions,
      so the source row reconstructs the image and the edits change it (Mokady et al. 2022 §4).
      Sampler settings come from the inversion (``settings`` may not change ``steps``).

  Returns:
    An :class:`EditResult`.

  Raises:
    ValueError: bad settings or words (see :func:`plan_edit`), too many prompts for the
      cascade's ``max_batch``, or a cascade without a tokenizer.
  """
  if edit is None:
    edit = PromptToPrompt(**edit_kwargs)
  elif edit_kwargs:
    edit = dataclasses.replace(edit, **edit_kwargs)
  names = [s.name for s in cascade.stages]
  unknown = sorted(set(edit.stages or ()) - set(names))
  if unknown:
    raise ValueError(f"edit stages {unknown} are not in the cascade (stages: {names})")
  encoder = getattr(cascade.text, "encoder", None)
  tokenizer = getattr(encoder, "tokenizer", None)
  if tokenizer is None:
    raise ValueError(
      "prompt-to-prompt needs the text encoder's tokenizer (word → token positions); this "
      "cascade only has an embedding cache: set config.text.encoder"
    )
  plan: EditPlan = plan_edit(tokenizer, source_prompt, target_prompts, edit)
  n = len(plan.prompts)
  inputs = None
  if inversion is not None:
    settings = {k: {**(settings or {}).get(k, {}), **v} for k, v in inversion.settings.items()}
    seed = inversion.seed
    inputs = {}
    for name, given in inversion.inputs().items():  # the source's row for every prompt
      nulls = given.null_emb is not None
      inputs[name] = StageInputs(
        latent=np.repeat(given.latent[:1], n, axis=0),
        null_emb=np.repeat(given.null_emb[:, :1], n, axis=1) if nulls else None,
        null_mask=np.repeat(given.null_mask[:1], n, axis=0) if nulls else None,
        aug_eps=None if given.aug_eps is None else np.repeat(given.aug_eps[:1], n, axis=0),
      )
  images, states = cascade.generate(
    plan.prompts,
    seed=seed,
    negative_prompts=None if negative_prompt is None else [negative_prompt] * n,
    settings=settings,
    start_stage=start_stage,
    init_image=init_image,
    strength=strength,
    progress=progress,
    control=plan,
    inputs=inputs,
  )
  attention = {
    name: state["maps"] / max(float(state["count"]), 1.0)
    for name, state in states.items()
    if edit.stages is None or name in edit.stages
  }
  return EditResult(plan.prompts, images, attention, plan.tokens, edit)
