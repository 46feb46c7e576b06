"""T5 encoder parity against transformers' PyTorch ``T5EncoderModel`` (needs torch, the oracle).

Checkpoint loading, config handling and errors without torch are in ``test_t5.py``.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from imagen_jax.models.t5 import T5Config, T5EncoderModule, relative_position_buckets
from imagen_jax.models.t5_loading import load_t5_encoder, save_t5_encoder
from imagen_jax.text import T5Encoder

try:
  from tests.t5_fixtures import hf_last_hidden_state, make_tiny_t5_dir, padded_batch
except ImportError:
  from t5_fixtures import hf_last_hidden_state, make_tiny_t5_dir, padded_batch

# torch is a test-only oracle (the [test] extra); everything here compares against it.
torch = pytest.importorskip("torch")

LENGTHS = [40, 1, 17, 33]  # distances up to 39 cross the log-bucket edges at 16 and 32
IDS, MASK = padded_batch(LENGTHS, 40)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  """Cached factory: (variant, sharded, with_decoder, dtype) -> checkpoint dir (transformers')."""
  made = {}

  def get(variant="v1_1", sharded=False, with_decoder=False, dtype="float32"):
    key = (variant, sharded, with_decoder, dtype)
    if key not in made:
      path = tmp_path_factory.mktemp("t5_" + "_".join(map(str, key)))
      made[key] = make_tiny_t5_dir(
        path, variant, sharded, with_decoder, dtype=dtype, with_tokenizer=False
      )
    return made[key]

  return get


@pytest.mark.parametrize(("num_buckets", "max_distance"), [(32, 128), (8, 20), (64, 300)])
def test_relative_position_buckets_match_transformers(num_buckets, max_distance):
  from transformers.models.t5.modeling_t5 import T5Attention

  length = 300
  pos = torch.arange(length)
  rel = pos[None, :] - pos[:, None]
  want = T5Attention._relative_position_bucket(rel, True, num_buckets, max_distance).numpy()
  np.testing.assert_array_equal(relative_position_buckets(length, num_buckets, max_distance), want)


@pytest.mark.parametrize(
  ("variant", "sharded", "with_decoder", "dtype"),
  [
    ("v1_1", False, False, "float32"),  # gated-GELU (T5 v1.1 / flan-t5 / Imagen's XXL)
    ("v1_0", False, False, "float32"),  # ReLU (original T5)
    ("v1_1", True, False, "float32"),  # sharded safetensors + index
    ("v1_0", True, True, "float32"),  # full T5ForConditionalGeneration, sharded
    ("v1_1", False, True, "float32"),  # full encoder-decoder, single file
    ("v1_1", False, False, "bfloat16"),  # bf16 tensors on disk, fp32 compute
    ("gated-silu", False, False, "float32"),
  ],
)
def test_parity_with_pytorch(ckpt, variant, sharded, with_decoder, dtype):
  path = ckpt(variant, sharded, with_decoder, dtype)
  want = hf_last_hidden_state(path, IDS, MASK)
  enc = T5Encoder.from_pretrained(path, progress=False)
  got = np.asarray(enc.encode(IDS, MASK))
  assert got.shape == (4, 40, 32) and got.dtype == np.float32
  # Every position, padded ones included, means the same as last_hidden_state.
  assert np.abs(got - want).max() <= 1e-4, np.abs(got - want).max()


def test_pytorch_bin_checkpoint(ckpt, tmp_path):
  src = ckpt("v1_1")
  (tmp_path / "config.json").write_text((src / "config.json").read_text())
  state = {k: torch.from_numpy(v) for k, v in load_file(src / "model.safetensors").items()}
  state["encoder.embed_tokens.weight"] = state["shared.weight"]  # old checkpoints store both
  torch.save(state, tmp_path / "pytorch_model.bin")
  got = np.asarray(T5Encoder.from_pretrained(tmp_path, progress=False).encode(IDS, MASK))
  assert np.abs(got - hf_last_hidden_state(src, IDS, MASK)).max() <= 1e-4


@pytest.mark.parametrize("ff", ["gated-gelu", "relu"])
def test_save_t5_encoder_loads_in_transformers(tmp_path, ff):
  """A module saved by save_t5_encoder is a valid HF checkpoint: PyTorch gives the same output.

  (``test_t5.py`` builds its torch-free checkpoints with save_t5_encoder; this keeps them honest.)
  """
  from transformers import T5EncoderModel

  cfg = T5Config(
    vocab_size=40, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, feed_forward_proj=ff
  )
  model = T5EncoderModule(cfg, rngs=nnx.Rngs(3), dtype=jnp.float32, param_dtype=jnp.float32)
  save_t5_encoder(model, tmp_path)
  ids = np.array([[5, 9, 3, 1, 0, 0], [7, 2, 1, 0, 0, 0]], np.int32)
  mask = ids > 0
  mask[:, 0] = True
  ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
  ref = T5EncoderModel.from_pretrained(str(tmp_path)).eval()
  with torch.no_grad():
    theirs = ref(
      input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask.astype(int))
    ).last_hidden_state.numpy()
  np.testing.assert_allclose(ours[mask], theirs[mask], atol=1e-4)
  reloaded = load_t5_encoder(tmp_path, progress=False)
  np.testing.assert_allclose(
    np.asarray(reloaded(jnp.asarray(ids), jnp.asarray(mask))), ours, atol=1e-6
  )
