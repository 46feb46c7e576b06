"""Words ↔ T5 tokens, and the token mappings of prompt-to-prompt edits (Hertz et al. 2022, §3.2).

An edit's target prompt attends over its own tokens; to inject the source's cross-attention maps,
each target token needs the source token(s) it corresponds to. All mappings here are arrays over the
fixed padded length L (data, not static), so new prompts of the same length bucket never recompile:

* ``matrix [L_src=L, L_tgt=L]``: target token j's map is Σ_i src_map[i] · matrix[i, j];
* ``has_source [L]``: 1 where target token j has a source counterpart (0 for a refinement's new
  words, which keep their own maps).

Word swaps (``replace``) need the same number of words; a swapped word may tokenize to a different
number of SentencePiece tokens: each of its n_tgt target tokens then gets 1/n_tgt of the summed maps
of its n_src source tokens (mass is conserved, as in the paper's code). Refinements (``refine``)
align the two token sequences (longest common subsequence) and map the shared tokens 1:1.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class TokenizedPrompt:
  """A prompt as the encoder sees it.

  Attributes:
    prompt: the text.
    ids: token ids ``[L]`` (padded).
    mask: ``[L]`` bool, True for real tokens (including the final ``</s>``).
    words: the whitespace-separated words of ``prompt``.
    spans: for every word, the positions of its tokens (a truncated word may have none).
  """

  prompt: str
  ids: np.ndarray
  mask: np.ndarray
  words: tuple[str, ...]
  spans: tuple[tuple[int, ...], ...]

  @property
  def length(self) -> int:
    return int(self.ids.shape[0])

  def positions(self, word: str) -> list[int]:
    """Token positions of every occurrence of ``word`` (case-insensitive, punctuation kept)."""
    want = word.strip().lower()
    if " " in want:
      raise ValueError(f"pass single words, got {word!r}")
    hits = [p for w, span in zip(self.words, self.spans) if w.lower() == want for p in span]
    if not hits:
      raise ValueError(f"word {word!r} is not in the prompt {self.prompt!r} (words: {self.words})")
    return hits


def tokenize_words(tokenizer, prompt: str) -> TokenizedPrompt:
  """Tokenizes ``prompt`` with an :class:`imagen_jax.text.Tokenizer` and finds each word's tokens.

  A token belongs to the word its characters come from (the tokenizer's offsets when it has
  them, else SentencePiece's "▁" word-start marks).
  """
  ids, mask = tokenizer([prompt])
  ids, mask = ids[0], mask[0]
  words = tuple(prompt.split())
  n_real = int(mask.sum())
  hf = tokenizer.hf_tokenizer
  owner = _token_words_by_offsets(hf, prompt, ids[:n_real])
  if owner is None:
    owner = _token_words_by_pieces(hf, ids[:n_real])
  spans = [[] for _ in words]
  for pos, w in enumerate(owner):
    if w is not None and w < len(words):
      spans[w].append(pos)
  return TokenizedPrompt(prompt, ids, mask, words, tuple(tuple(s) for s in spans))


def _word_starts(prompt: str) -> list[tuple[int, int]]:
  out, pos = [], 0
  for word in prompt.split():
    start = prompt.index(word, pos)
    out.append((start, start + len(word)))
    pos = start + len(word)
  return out


def _token_words_by_offsets(hf, prompt: str, ids: np.ndarray) -> list[int | None] | None:
  try:
    enc = hf(prompt, add_special_tokens=True, return_offsets_mapping=True, verbose=False)
  except (NotImplementedError, TypeError, ValueError):
    return None
  offsets = enc.get("offset_mapping")
  if offsets is None or list(enc["input_ids"][: len(ids)]) != [int(i) for i in ids]:
    return None
  bounds = _word_starts(prompt)
  owner: list[int | None] = []
  for start, end in offsets[: len(ids)]:
    if end <= start:  # special tokens (</s>) have empty offsets
      owner.append(None)
      continue
    owner.append(next((w for w, (a, b) in enumerate(bounds) if start < b and end > a), None))
  return owner


def _token_words_by_pieces(hf, ids: np.ndarray) -> list[int | None]:
  pieces = hf.convert_ids_to_tokens([int(i) for i in ids])
  special = set(getattr(hf, "all_special_ids", []) or [])
  owner: list[int | None] = []
  word, pending_start = -1, False
  for tid, piece in zip(ids, pieces):
    if int(tid) in special:
      owner.append(None)
      continue
    if piece.startswith("\u2581") or word < 0:
      if piece == "\u2581":  # a lone word-start mark: the word's text is in the next piece
        word += 1
        pending_start = True
        owner.append(word)
        continue
      if not pending_start:
        word += 1
    pending_start = False
    owner.append(word)
  return owner


def replace_mapping(source: TokenizedPrompt, target: TokenizedPrompt) -> tuple[np.ndarray, ...]:
  """Word-swap mapping (P2P "replace"): ``(matrix [L, L], has_source [L])``.

  Raises:
    ValueError: the prompts have different numbers of words (use ``refine`` to add words).
  """
  if len(source.words) != len(target.words):
    raise ValueError(
      f"replace edits swap words one for one, but {source.prompt!r} has {len(source.words)} words "
      f"and {target.prompt!r} has {len(target.words)}; use mode='refine' to add or remove words"
    )
  length = source.length
  matrix = np.zeros((length, length), np.float32)
  mapped = np.zeros(length, bool)
  for s_span, t_span in zip(source.spans, target.spans):
    if not s_span or not t_span:
      continue
    if len(s_span) == len(t_span):
      matrix[list(s_span), list(t_span)] = 1.0
    else:
      matrix[np.ix_(list(s_span), list(t_span))] = 1.0 / len(t_span)
    mapped[list(t_span)] = True
  # Tokens outside the words (</s>, padding) map to the same position.
  s_rest = [p for p in range(length) if not any(p in s for s in source.spans)]
  t_rest = [p for p in range(length) if not mapped[p]]
  for s_pos, t_pos in zip(_specials_in_order(source, s_rest), _specials_in_order(target, t_rest)):
    matrix[s_pos, t_pos] = 1.0
  return matrix, np.ones(length, np.float32)


def _specials_in_order(prompt: TokenizedPrompt, positions: list[int]) -> list[int]:
  # The non-word tokens of a prompt: its </s> (and any other special tokens) first, then the
  # padding, so that the source's </s> maps onto the target's </s> even when lengths differ.
  n_real = int(prompt.mask.sum())
  real = [p for p in positions if p < n_real]
  pad = [p for p in positions if p >= n_real]
  return real + pad


def refine_mapping(source: TokenizedPrompt, target: TokenizedPrompt) -> tuple[np.ndarray, ...]:
  """Refinement mapping (P2P "refine"): shared tokens aligned 1:1 by the longest common
  subsequence of the real tokens; new target tokens have ``has_source = 0``.

  Returns:
    ``(matrix [L, L], has_source [L])``.
  """
  length = source.length
  s_ids = [int(i) for i in source.ids[: int(source.mask.sum())]]
  t_ids = [int(i) for i in target.ids[: int(target.mask.sum())]]
  pairs = _lcs_pairs(s_ids, t_ids)
  matrix = np.zeros((length, length), np.float32)
  has_source = np.zeros(length, np.float32)
  for i, j in pairs:
    matrix[i, j] = 1.0
    has_source[j] = 1.0
  # Padding maps to padding (it carries no attention; kept so the matrix has no empty rows).
  for p in range(max(len(s_ids), len(t_ids)), length):
    matrix[p, p] = 1.0
    has_source[p] = 1.0
  return matrix, has_source


def _lcs_pairs(a: Sequence[int], b: Sequence[int]) -> list[tuple[int, int]]:
  """Index pairs of a longest common subsequence of ``a`` and ``b`` (ties: earliest in ``a``)."""
  n, m = len(a), len(b)
  table = np.zeros((n + 1, m + 1), np.int32)
  for i in range(n - 1, -1, -1):
    for j in range(m - 1, -1, -1):
      if a[i] == b[j]:
        table[i, j] = table[i + 1, j + 1] + 1
      else:
        table[i, j] = max(table[i + 1, j], table[i, j + 1])
  pairs, i, j = [], 0, 0
  while i < n and j < m:
    if a[i] == b[j]:
      pairs.append((i, j))
      i, j = i + 1, j + 1
    elif table[i + 1, j] >= table[i, j + 1]:
      i += 1
    else:
      j += 1
  return pairs


def token_weights(target: TokenizedPrompt, weights: Mapping[str, float]) -> np.ndarray:
  """P2P reweighting: ``[L]`` scale of each target token's attention (1 for unlisted words)."""
  out = np.ones(target.length, np.float32)
  for word, scale in weights.items():
    out[target.positions(word)] = float(scale)
  return out


def step_schedule(
  steps: int, fraction: float | tuple[float, float], what: str = "cross_replace"
) -> np.ndarray:
  """``[steps]`` 0/1: the steps in ``[start, end)`` of a fraction (or (start, end) pair) of the
  sampling steps, counted from the first (noisiest) step."""
  start, end = (0.0, fraction) if np.isscalar(fraction) else tuple(fraction)
  if not 0.0 <= float(start) <= float(end) <= 1.0:
    raise ValueError(f"{what} must be a fraction in [0, 1] or a (start, end) pair, got {fraction}")
  i = np.arange(steps)
  return ((i >= int(start * steps)) & (i < int(end * steps))).astype(np.float32)


def word_step_alphas(
  target: TokenizedPrompt,
  steps: int,
  default: float | tuple[float, float],
  per_word: Mapping[str, float | tuple[float, float]] | None = None,
) -> np.ndarray:
  """``[steps, L]``: at which steps each target token takes the source's maps (cross replace)."""
  alphas = np.repeat(step_schedule(steps, default)[:, None], target.length, axis=1)
  for word, fraction in (per_word or {}).items():
    alphas[:, target.positions(word)] = step_schedule(steps, fraction)[:, None]
  return alphas
