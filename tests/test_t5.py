"""T5 checkpoint loading without torch: config handling, sharding, bad files, Hub ids.

These tests never need torch: the tiny checkpoints are written with numpy/safetensors (see
``make_checkpoint``). The parity tests against transformers' PyTorch ``T5EncoderModel`` are in
``test_t5_parity.py``.
"""

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

from imagen_jax.models.t5 import T5Config, T5EncoderModule
from imagen_jax.models.t5_loading import CheckpointError, load_t5_encoder, save_t5_encoder
from imagen_jax.text import T5Encoder

try:
  from tests.t5_fixtures import padded_batch, tiny_hf_config
except ImportError:
  from t5_fixtures import padded_batch, tiny_hf_config

LENGTHS = [40, 1, 17, 33]
IDS, MASK = padded_batch(LENGTHS, 40)
SHARD_BYTES = 20_000  # as make_tiny_t5_dir(sharded=True): several shards, some decoder-only


def make_checkpoint(
  path: Path, variant: str = "v1_1", sharded: bool = False, with_decoder: bool = False
) -> Path:
  """A tiny Hugging Face T5 checkpoint directory written without torch.

  ``config.json`` is transformers' own ``T5Config.save_pretrained`` (torch-free), the encoder
  tensors a random :class:`T5EncoderModule` written by ``save_t5_encoder`` (HF names; checked
  loadable by transformers in ``test_t5_parity.py``). ``with_decoder`` adds decoder and
  ``lm_head`` tensors as in a ``T5ForConditionalGeneration`` checkpoint (the loader must ignore
  them); ``sharded`` splits the tensors, in that order, into ``model-0000k-of-0000n.safetensors``
  files of at most ``SHARD_BYTES`` with a ``model.safetensors.index.json``, like
  ``save_pretrained(max_shard_size=...)``.
  """
  arch = "T5ForConditionalGeneration" if with_decoder else "T5EncoderModel"
  hf = tiny_hf_config(variant, architectures=[arch], is_encoder_decoder=with_decoder)
  cfg = T5Config.from_hf_dict(hf.to_dict())
  model = T5EncoderModule(cfg, rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32)
  save_t5_encoder(model, path)
  hf.save_pretrained(str(path))  # replaces save_t5_encoder's config.json with transformers'
  tensors = load_file(path / "model.safetensors")
  if with_decoder:
    # Stand-ins named like a decoder's (shapes do not matter: the loader must skip them all).
    rng = np.random.default_rng(1)
    for name, arr in list(tensors.items()):
      if name.startswith("encoder."):
        tensors["decoder." + name.removeprefix("encoder.")] = rng.normal(size=arr.shape)
    tensors["lm_head.weight"] = rng.normal(size=tensors["shared.weight"].shape)
  tensors = {k: np.asarray(v, np.float32) for k, v in tensors.items()}
  (path / "model.safetensors").unlink()
  if not sharded:
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path
  shards, size = [{}], 0
  for name, arr in tensors.items():
    if shards[-1] and size + arr.nbytes > SHARD_BYTES:
      shards.append({})
      size = 0
    shards[-1][name] = arr
    size += arr.nbytes
  weight_map = {}
  for k, shard in enumerate(shards, 1):
    fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
    save_file(shard, str(path / fname), metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(shard, fname))
  index = {
    "metadata": {"total_size": sum(a.nbytes for a in tensors.values())},
    "weight_map": weight_map,
  }
  (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
  return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  """Cached factory: (variant, sharded, with_decoder) -> checkpoint dir (torch-free)."""
  made = {}

  def get(variant="v1_1", sharded=False, with_decoder=False):
    key = (variant, sharded, with_decoder)
    if key not in made:
      path = tmp_path_factory.mktemp("t5_" + "_".join(map(str, key)))
      made[key] = make_checkpoint(path, variant, sharded, with_decoder)
    return made[key]

  return get


@pytest.fixture(scope="module")
def reference(ckpt):
  """fp32 hidden states of ``ckpt("v1_1")`` loaded plainly (its parity with PyTorch is tested in
  test_t5_parity.py for the same loader): the reference for dtype and sharding variants."""
  return np.asarray(T5Encoder.from_pretrained(ckpt("v1_1"), progress=False).encode(IDS, MASK))


def _copy(src: Path, dst: Path) -> Path:
  """A copy of a checkpoint directory to damage (the fixture's are shared)."""
  shutil.copytree(src, dst)
  return dst


# ---------------------------------------------------------------------------------------------
# Loading: dtypes, logical names, shardings.


def test_bin_without_torch_says_convert(ckpt, tmp_path, monkeypatch):
  (tmp_path / "config.json").write_text((ckpt("v1_1") / "config.json").read_text())
  (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
  monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
  with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*torch.*safetensors"):
    load_t5_encoder(tmp_path, progress=False)


def test_bf16_compute_is_close_to_fp32(ckpt, reference):
  path = ckpt("v1_1")
  enc = T5Encoder.from_pretrained(path, dtype=jnp.bfloat16, progress=False)
  assert enc.state["blocks"][0]["attn"]["q"]["kernel"][...].dtype == jnp.bfloat16
  got = enc.encode(IDS, MASK)
  assert got.dtype == jnp.bfloat16
  err = np.abs(np.asarray(got, np.float32) - reference).max() / np.abs(reference).max()
  assert err < 5e-2, err
  # bf16 compute with fp32 parameters also works.
  mixed = T5Encoder.from_pretrained(
    path, dtype=jnp.bfloat16, param_dtype=jnp.float32, progress=False
  )
  got = np.asarray(mixed.encode(IDS, MASK), np.float32)
  assert np.abs(got - reference).max() / np.abs(reference).max() < 5e-2


def test_loaded_parameters_carry_logical_names(ckpt):
  model = load_t5_encoder(ckpt("v1_1"), progress=False)
  specs = nnx.get_partition_spec(nnx.state(model))
  assert tuple(specs["embed"]["embedding"].get_value()) == ("vocab", "embed")
  assert tuple(specs["blocks"][0]["attn"]["q"]["kernel"].get_value()) == ("embed", "heads")
  assert tuple(specs["blocks"][1]["mlp"]["wo"]["kernel"].get_value()) == ("mlp", "embed")


def test_load_into_shardings(ckpt, reference):
  from jax.sharding import Mesh, NamedSharding, PartitionSpec

  path = ckpt("v1_1")
  mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "fsdp"))
  rules = [("embed", "fsdp"), ("mlp", "fsdp"), ("heads", "fsdp")]
  enc = T5Encoder.from_pretrained(path, shardings=(mesh, rules), progress=False)
  kernel = enc.state["blocks"][0]["mlp"]["wo"]["kernel"][...]
  assert isinstance(kernel.sharding, NamedSharding)
  assert kernel.sharding.spec == PartitionSpec("fsdp", None)  # mlp -> fsdp; embed: fsdp taken
  np.testing.assert_allclose(np.asarray(enc.encode(IDS, MASK)), reference, atol=1e-5)
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
  """Rewrites ``path/model.safetensors`` as ``fn(tensors)``."""
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
  # The same weights as loading the whole local directory (whose PyTorch parity is tested).
  want = T5Encoder.from_pretrained(repo, progress=False).encode(IDS, MASK)
  np.testing.assert_array_equal(np.asarray(enc.encode(IDS, MASK)), np.asarray(want))
