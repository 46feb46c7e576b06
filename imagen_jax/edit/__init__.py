"""Image editing on top of the samplers and the cascade: prompt-to-prompt (Hertz et al. 2022).

* :func:`prompt_to_prompt` + :class:`PromptToPrompt`: word swaps, refinements, reweighting and
  local blending by injecting the source prompt's attention into the edited prompts' sampling.
* :mod:`~imagen_jax.edit.tokens`: words ↔ T5 tokens, the token mappings of each edit.
* :mod:`~imagen_jax.edit.attention_maps`: per-word maps, overlays and captioned rows.
"""

from imagen_jax.edit.attention_edit import MODES, EditPlan, PromptToPrompt, StageEdit, plan_edit
from imagen_jax.edit.attention_maps import attention_row, overlay, word_maps
from imagen_jax.edit.prompt_to_prompt import EditResult, prompt_to_prompt
from imagen_jax.edit.tokens import TokenizedPrompt, tokenize_words

__all__ = [
  "MODES",
  "EditPlan",
  "EditResult",
  "PromptToPrompt",
  "StageEdit",
  "TokenizedPrompt",
  "attention_row",
  "overlay",
  "plan_edit",
  "prompt_to_prompt",
  "tokenize_words",
  "word_maps",
]
