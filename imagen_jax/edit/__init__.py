"""Image editing on top of the samplers and the cascade.

* :mod:`~imagen_jax.edit.image_ops`: inpainting / outpainting, inversion (DDIM, DPM-Solver++,
  null-text), variations, interpolations and text diffs, one function each.

* :func:`prompt_to_prompt` + :class:`PromptToPrompt`: word swaps, refinements, reweighting and
  local blending by injecting the source prompt's attention into the edited prompts' sampling.
* :mod:`~imagen_jax.edit.tokens`: words ↔ T5 tokens, the token mappings of each edit.
* :mod:`~imagen_jax.edit.attention_maps`: per-word maps, overlays and captioned rows.
"""

from imagen_jax.edit.attention_edit import MODES, EditPlan, PromptToPrompt, StageEdit, plan_edit
from imagen_jax.edit.attention_maps import attention_row, overlay, word_maps
from imagen_jax.edit.image_ops import (
  inpaint,
  interpolate,
  invert,
  outpaint_canvas,
  reconstruct,
  text_diff,
  variations,
)
from imagen_jax.edit.prompt_to_prompt import EditResult, prompt_to_prompt
from imagen_jax.edit.tokens import TokenizedPrompt, tokenize_words

__all__ = [
  "EditPlan",
  "EditResult",
  "MODES",
  "PromptToPrompt",
  "StageEdit",
  "TokenizedPrompt",
  "attention_row",
  "inpaint",
  "interpolate",
  "invert",
  "outpaint_canvas",
  "overlay",
  "plan_edit",
  "prompt_to_prompt",
  "reconstruct",
  "text_diff",
  "tokenize_words",
  "variations",
  "word_maps",
]
