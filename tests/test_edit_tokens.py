"""Prompt-to-prompt token mappings against hand-worked examples, and words ↔ T5 tokens."""

from __future__ import annotations

import numpy as np
import pytest

from imagen_jax.edit import tokens as tok
from imagen_jax.text import Tokenizer
from tests.t5_fixtures import make_tiny_tokenizer_dir

L = 8


def _prompt(text, ids, spans):
  """A hand-tokenized prompt: ``ids`` are the real tokens (``</s>`` = 1 last), padded to L."""
  full = np.zeros(L, np.int32)
  full[: len(ids)] = ids
  mask = np.arange(L) < len(ids)
  return tok.TokenizedPrompt(text, full, mask, tuple(text.split()), tuple(map(tuple, spans)))


# "a red car</s>" and swaps of "red" for a 1-token and a 2-token word.
SRC = _prompt("a red car", [5, 9, 12, 1], [[0], [1], [2]])
SAME_LEN = _prompt("a blue car", [5, 7, 12, 1], [[0], [1], [2]])
LONGER = _prompt("a crimson car", [5, 20, 21, 12, 1], [[0], [1, 2], [3]])


def test_replace_same_token_count_is_a_permutation():
  m, a = tok.replace_mapping(SRC, SAME_LEN)
  np.testing.assert_array_equal(m, np.eye(L))  # every token keeps its position
  np.testing.assert_array_equal(a, np.ones(L))


def test_replace_word_of_more_tokens_splits_its_mass():
  m, a = tok.replace_mapping(SRC, LONGER)
  want = np.zeros((L, L), np.float32)
  want[0, 0] = 1.0  # a -> a
  want[1, 1] = want[1, 2] = 0.5  # red -> crim|son: each gets half of red's map
  want[2, 3] = 1.0  # car -> car (shifted by one)
  want[3, 4] = 1.0  # </s> -> </s>
  for s, t in zip(range(4, L - 1), range(5, L)):  # padding -> padding, in order
    want[s, t] = 1.0
  np.testing.assert_array_equal(m, want)
  # Mass is conserved: a source map summing to 1 over its real tokens still does.
  src_map = np.array([0.1, 0.6, 0.2, 0.1, 0, 0, 0, 0], np.float32)
  np.testing.assert_allclose((src_map @ m).sum(), 1.0, rtol=1e-6)
  np.testing.assert_allclose(src_map @ m, [0.1, 0.3, 0.3, 0.2, 0.1, 0, 0, 0], rtol=1e-6)
  # The other way round: two source tokens feed one target token.
  back, _ = tok.replace_mapping(LONGER, SRC)
  assert back[1, 1] == back[2, 1] == 1.0 and back[3, 2] == 1.0 and back[4, 3] == 1.0


def test_replace_needs_equal_word_counts():
  with pytest.raises(ValueError, match="refine"):
    tok.replace_mapping(SRC, _prompt("a big red car", [5, 3, 9, 12, 1], [[0], [1], [2], [3]]))


def test_refine_aligns_shared_tokens_and_marks_new_ones():
  # "a red car" -> "a big red car": "big" is new, the rest shifts by one.
  tgt = _prompt("a big red car", [5, 3, 9, 12, 1], [[0], [1], [2], [3]])
  m, a = tok.refine_mapping(SRC, tgt)
  pairs = {(int(i), int(j)) for i, j in zip(*np.nonzero(m[:4, :5]))}
  assert pairs == {(0, 0), (1, 2), (2, 3), (3, 4)}
  np.testing.assert_array_equal(a[:5], [1, 0, 1, 1, 1])
  assert a[5:].tolist() == [1.0] * (L - 5) and m[5, 5] == 1.0  # padding kept
  # Removing a word: the target's tokens all have a source.
  m2, a2 = tok.refine_mapping(tgt, SRC)
  assert {(int(i), int(j)) for i, j in zip(*np.nonzero(m2[:5, :4]))} == {
    (0, 0),
    (2, 1),
    (3, 2),
    (4, 3),
  }
  np.testing.assert_array_equal(a2[:4], [1, 1, 1, 1])


def test_weights_and_step_schedules():
  w = tok.token_weights(LONGER, {"crimson": -0.5, "car": 2})
  np.testing.assert_array_equal(w[:5], [1, -0.5, -0.5, 2, 1])
  with pytest.raises(ValueError, match="not in the prompt"):
    tok.token_weights(LONGER, {"blue": 2})
  np.testing.assert_array_equal(tok.step_schedule(10, 0.4), [1] * 4 + [0] * 6)
  np.testing.assert_array_equal(tok.step_schedule(10, (0.2, 0.5)), [0, 0, 1, 1, 1, 0, 0, 0, 0, 0])
  alphas = tok.word_step_alphas(LONGER, 4, 0.5, {"crimson": 1.0})
  assert alphas.shape == (4, L)
  np.testing.assert_array_equal(alphas[:, 0], [1, 1, 0, 0])
  np.testing.assert_array_equal(alphas[:, 1], [1, 1, 1, 1])
  with pytest.raises(ValueError, match="cross_replace"):
    tok.step_schedule(10, 1.5)


def test_words_find_their_tokens_with_a_real_sentencepiece_tokenizer(tmp_path):
  hf_dir = make_tiny_tokenizer_dir(tmp_path / "tok")
  tokenizer = Tokenizer.from_pretrained(hf_dir, max_length=32)
  for prompt in ["a photo of a corgi on the beach", "an astronaut riding a zebra", "two  dogs"]:
    t = tok.tokenize_words(tokenizer, prompt)
    assert t.words == tuple(prompt.split())
    n_real = int(t.mask.sum())
    covered = sorted(p for span in t.spans for p in span)
    assert covered == list(range(n_real - 1))  # every token but </s> belongs to one word
    for word, span in zip(t.words, t.spans):
      # The oracle: decoding a word's tokens gives the word back.
      assert tokenizer.hf_tokenizer.decode(t.ids[list(span)]).strip() == word
  assert any(len(s) > 1 for s in tok.tokenize_words(tokenizer, "an astronaut riding a zebra").spans)
  # Words cut off by truncation have no tokens (and are then left out of maps and edits).
  short = Tokenizer.from_pretrained(hf_dir, max_length=8)
  with pytest.warns(UserWarning, match="truncated"):
    cut = tok.tokenize_words(short, "a photo of a corgi on the beach")
  assert cut.spans[0] == (0,) and cut.spans[-1] == () and cut.words[-1] == "beach"
