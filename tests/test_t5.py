"""T5 encoder parity against transformers' PyTorch ``T5EncoderModel`` and checkpoint loading."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from imagen_jax.models.t5 import T5Config, T5EncoderModule, relative_position_buckets
from imagen_jax.models.t5_loading import CheckpointError, load_t5_encoder
from imagen_jax.text import T5Encoder

try:
  from tests.t5_fixtures import hf_last_hidden_state, make_tiny_t5_dir, padded_batch
except ImportError:
  from t5_fixtures import hf_last_hidden_state, make_tiny_t5_dir, padded_batch

torch = pytest.importorskip("torch")

LENGTHS = [40, 1, 17, 33]  # distances up to 39 cross the log-bucket edges at 16 and 32
IDS, MASK = padded_batch(LENGTHS, 40)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  """Cached factory: (variant, sharded, with_decoder, dtype) -> checkpoint dir."""
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


def _copy(src: Path, dst: Path) -> Path:
  shutil.copytree(src, dst)
  return dst


# ---------------------------------------------------------------------------------------------
# Numerics.


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


def test_bin_without_torch_says_convert(ckpt, tmp_path, monkeypatch):
  (tmp_path / "config.json").write_text((ckpt("v1_1") / "config.json").read_text())
  (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
  monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
  with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*torch.*safetensors"):
    load_t5_encoder(tmp_path, progress=False)


def test_bf16_compute_is_close_to_fp32(ckpt):
  path = ckpt("v1_1")
  ref = hf_last_hidden_state(path, IDS, MASK)
  enc = T5Encoder.from_pretrained(path, dtype=jnp.bfloat16, progress=False)
  assert enc.state["blocks"][0]["attn"]["q"]["kernel"][...].dtype == jnp.bfloat16
  got = enc.encode(IDS, MASK)
  assert got.dtype == jnp.bfloat16
  err = np.abs(np.asarray(got, np.float32) - ref).max() / np.abs(ref).max()
  assert err < 5e-2, err
  # bf16 compute with fp32 parameters also works.
  mixed = T5Encoder.from_pretrained(
    path, dtype=jnp.bfloat16, param_dtype=jnp.float32, progress=False
  )
  assert (
    np.abs(np.asarray(mixed.encode(IDS, MASK), np.float32) - ref).max() / np.abs(ref).max() < 5e-2
  )


def test_loaded_parameters_carry_logical_names(ckpt):
  model = load_t5_encoder(ckpt("v1_1"), progress=False)
  specs = nnx.get_partition_spec(nnx.state(model))
  assert tuple(specs["embed"]["embedding"].get_value()) == ("vocab", "embed")
  assert tuple(specs["blocks"][0]["attn"]["q"]["kernel"].get_value()) == ("embed", "heads")
  assert tuple(specs["blocks"][1]["mlp"]["wo"]["kernel"].get_value()) == ("mlp", "embed")


def test_load_into_shardings(ckpt):
  from jax.sharding import Mesh, NamedSharding, PartitionSpec

  path = ckpt("v1_1")
  ref = hf_last_hidden_state(path, IDS, MASK)
  mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "fsdp"))
  rules = [("embed", "fsdp"), ("mlp", "fsdp"), ("heads", "fsdp")]
  enc = T5Encoder.from_pretrained(path, shardings=(mesh, rules), progress=False)
  kernel = enc.state["blocks"][0]["mlp"]["wo"]["kernel"][...]
  assert isinstance(kernel.sharding, NamedSharding)
  assert kernel.sharding.spec == PartitionSpec("fsdp", None)  # mlp -> fsdp; embed: fsdp taken
  np.testing.assert_allclose(np.asarray(enc.encode(IDS, MASK)), ref, atol=1e-4)
  seen = []
  replicated = NamedSharding(mesh, PartitionSpec())
  T5Encoder.from_pretrained(
    path, shardings=lambda names, shape: seen.append(names) or replicated, progress=False
  )
  assert ("vocab", "embed") in seen


@pytest.mark.slow
def test_fsdp_sharded_load_on_four_cpu_devices(ckpt):
  """Real multi-device sharding needs XLA_FLAGS before jax starts: run in a subprocess."""
  script = textwrap.dedent(f"""
    import numpy as np, jax
    from jax.sharding import Mesh
    from imagen_jax.text import T5Encoder
    assert jax.device_count() == 4
    path = {str(ckpt("v1_1"))!r}
    ids = np.arange(3, 35, dtype=np.int32).reshape(4, 8); mask = np.ones((4, 8), bool)
    ref = np.asarray(T5Encoder.from_pretrained(path, progress=False).encode(ids, mask))
    mesh = Mesh(np.array(jax.devices()).reshape(1, 4), ("data", "fsdp"))
    rules = [("embed", "fsdp"), ("mlp", "fsdp"), ("heads", "fsdp"), ("vocab", None)]
    enc = T5Encoder.from_pretrained(path, shardings=(mesh, rules), progress=False)
    k = enc.state["blocks"][0]["mlp"]["wi_0"]["kernel"][...]
    assert k.addressable_shards[0].data.shape == (8, 64), k.addressable_shards[0].data.shape
    np.testing.assert_allclose(np.asarray(enc.encode(ids, mask)), ref, atol=1e-5)
    print("ok")
  """)
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  env["JAX_PLATFORMS"] = "cpu"
  out = subprocess.run(
    [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
  )
  assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


# ---------------------------------------------------------------------------------------------
# Config and abstract (weightless) construction.


def test_config_from_hf_dict_and_presets(ckpt):
  cfg = T5Config.from_hf_dict(json.loads((ckpt("v1_1") / "config.json").read_text()))
  assert (cfg.d_model, cfg.num_layers, cfg.activation, cfg.is_gated) == (32, 2, "gelu_new", True)
  assert T5Config.t5_base().activation == "relu" and not T5Config.t5_base().is_gated
  xxl = T5Config.t5_v1_1_xxl()
  assert (xxl.d_model, xxl.num_layers, xxl.d_ff, xxl.num_heads) == (4096, 24, 10240, 64)
  # Built abstractly: no 4.76B random weights are ever allocated.
  abstract = nnx.eval_shape(lambda: T5EncoderModule(xxl, rngs=nnx.Rngs(0)))
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract)))
  assert n == xxl.num_params and 4.7e9 < n < 4.8e9


@pytest.mark.parametrize(
  ("edit", "match"),
  [
    ({"feed_forward_proj": "gated-foo"}, "feed_forward_proj"),
    ({"feed_forward_proj": "a-b-c"}, "feed_forward_proj"),
    ({"model_type": "umt5"}, "model_type"),
    ({"is_decoder": True}, "is_decoder"),
  ],
)
def test_unsupported_config_keys(ckpt, tmp_path, edit, match):
  path = _copy(ckpt("v1_1"), tmp_path / "c")
  config = json.loads((path / "config.json").read_text())
  (path / "config.json").write_text(json.dumps({**config, **edit}))
  with pytest.raises(CheckpointError, match=rf"config\.json.*{match}"):
    T5Encoder.from_pretrained(path, progress=False)


# ---------------------------------------------------------------------------------------------
# Bad checkpoints: every error names the file (and the tensor).


def _rewrite(path: Path, fn) -> None:
  tensors = load_file(path / "model.safetensors")
  save_file(fn(tensors), path / "model.safetensors", metadata={"format": "pt"})


def test_missing_files(ckpt, tmp_path):
  with pytest.raises(CheckpointError, match="no such checkpoint directory"):
    T5Encoder.from_pretrained(tmp_path / "does-not-exist")
  path = _copy(ckpt("v1_1"), tmp_path / "c")
  (path / "model.safetensors").unlink()
  with pytest.raises(CheckpointError, match="no weights found"):
    load_t5_encoder(path)
  (path / "config.json").unlink()
  with pytest.raises(CheckpointError, match=r"config\.json: file not found"):
    load_t5_encoder(path)


def test_missing_shard(ckpt, tmp_path):
  path = _copy(ckpt("v1_1", sharded=True), tmp_path / "c")
  index = json.loads((path / "model.safetensors.index.json").read_text())
  shard = index["weight_map"]["encoder.final_layer_norm.weight"]
  (path / shard).unlink()
  with pytest.raises(CheckpointError, match=rf"{shard}: shard listed in .* is missing"):
    load_t5_encoder(path)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_safetensors(ckpt, tmp_path, damage):
  path = _copy(ckpt("v1_1"), tmp_path / "c")
  f = path / "model.safetensors"
  data = f.read_bytes()
  f.write_bytes({"garbage": b"\x00garbage" * 64, "truncated": data[:-50], "empty": b""}[damage])
  with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors"):
    load_t5_encoder(path)


def test_missing_tensor(ckpt, tmp_path):
  path = _copy(ckpt("v1_1"), tmp_path / "c")
  name = "encoder.block.1.layer.1.DenseReluDense.wi_1.weight"
  _rewrite(path, lambda t: {k: v for k, v in t.items() if k != name})
  with pytest.raises(
    CheckpointError, match=rf"model\.safetensors: encoder tensor {name} is missing"
  ):
    load_t5_encoder(path)
  path = _copy(ckpt("v1_1"), tmp_path / "d")
  _rewrite(path, lambda t: {k: v for k, v in t.items() if k != "shared.weight"})
  with pytest.raises(CheckpointError, match=r"encoder\.embed_tokens\.weight \(nor shared"):
    load_t5_encoder(path)


def test_unexpected_encoder_tensor(ckpt, tmp_path):
  path = _copy(ckpt("v1_1"), tmp_path / "c")
  extra = "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"
  _rewrite(path, lambda t: {**t, extra: np.zeros((32, 4), np.float32)})
  with pytest.raises(CheckpointError, match=rf"model\.safetensors: unexpected .*{extra}"):
    load_t5_encoder(path)


def test_shape_mismatch_names_file_tensor_and_shapes(ckpt, tmp_path):
  path = _copy(ckpt("v1_1"), tmp_path / "c")
  config = json.loads((path / "config.json").read_text())
  (path / "config.json").write_text(json.dumps({**config, "d_ff": 96}))
  pattern = r"model\.safetensors: tensor encoder\.block\.0\.layer\.1\.DenseReluDense\.wi_0\.weight"
  with pytest.raises(CheckpointError, match=pattern + r" has shape \[64, 32\].*\[96, 32\]"):
    load_t5_encoder(path)


def test_dtype_mismatch(ckpt, tmp_path):
  path = _copy(ckpt("v1_1"), tmp_path / "c")
  name = "encoder.final_layer_norm.weight"
  _rewrite(path, lambda t: {**t, name: np.ones(32, np.int32)})
  with pytest.raises(CheckpointError, match=rf"tensor {name} has dtype I32"):
    load_t5_encoder(path)
  with pytest.raises(CheckpointError, match="floating dtype"):
    load_t5_encoder(ckpt("v1_1"), dtype=jnp.int32)
  with pytest.raises(CheckpointError, match="float16 compute overflows"):
    load_t5_encoder(ckpt("v1_1"), dtype=jnp.float16)


# ---------------------------------------------------------------------------------------------
# Hugging Face Hub ids (no network in tests).


def test_hub_id_offline_fails_clearly(monkeypatch, tmp_path):
  import huggingface_hub

  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
  with pytest.raises(CheckpointError, match=r"google/t5-v1_1-xxl.*HF_HUB_OFFLINE.*local"):
    T5Encoder.from_pretrained("google/t5-v1_1-xxl")


def test_hub_id_downloads_only_encoder_shards(ckpt, tmp_path, monkeypatch):
  """The online path, with huggingface_hub faked by a local 'repo'."""
  import huggingface_hub

  repo = ckpt("v1_0", sharded=True, with_decoder=True)
  snapshot = tmp_path / "snapshot"
  snapshot.mkdir()
  fetched = []

  def hf_hub_download(repo_id, filename, *, subfolder=None, revision=None, local_files_only=False):
    assert repo_id == "org/tiny-t5" and not local_files_only
    fetched.append(filename)
    shutil.copy(repo / filename, snapshot / filename)
    return str(snapshot / filename)

  monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
  monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
  monkeypatch.setattr(
    huggingface_hub, "list_repo_files", lambda repo_id, revision=None: os.listdir(repo)
  )
  enc = T5Encoder.from_pretrained("org/tiny-t5", progress=False)
  index = json.loads((repo / "model.safetensors.index.json").read_text())["weight_map"]
  decoder_only = {v for k, v in index.items() if k.startswith("decoder.")} - {
    v for k, v in index.items() if not k.startswith("decoder.")
  }
  assert decoder_only and not decoder_only & set(fetched)
  got = np.asarray(enc.encode(IDS, MASK))
  assert np.abs(got - hf_last_hidden_state(repo, IDS, MASK)).max() <= 1e-4


@pytest.mark.parametrize("ff", ["gated-gelu", "relu"])
def test_save_t5_encoder_loads_in_transformers(tmp_path, ff):
  """A module saved by save_t5_encoder is a valid HF checkpoint: PyTorch gives the same output."""
  torch = pytest.importorskip("torch")
  from transformers import T5EncoderModel

  from imagen_jax.models.t5_loading import save_t5_encoder

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
