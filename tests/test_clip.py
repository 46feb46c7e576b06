"""CLIP in JAX against transformers' PyTorch ``CLIPModel`` (the oracle), plus loading and
preprocessing: parity of features and logits, tokenizer and ``CLIPImageProcessor`` equality,
strict loading errors, sharded checkpoints, ``save_clip`` round trips and bf16 compute.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from imagen_jax.clip import CLIP
from imagen_jax.models.clip import CLIPConfig, CLIPModule
from imagen_jax.models.clip_loading import CheckpointError, load_clip, read_clip_config, save_clip
from imagen_jax.sharding import DEFAULT_RULES, make_mesh

try:
  from tests import clip_fixtures as fx
  from tests.torch_oracles import declare_torchvision_ops
except ImportError:
  import clip_fixtures as fx
  from torch_oracles import declare_torchvision_ops

# torch is a test-only oracle (the [test] extra); transformers' CLIP imports need torchvision.
torch = pytest.importorskip("torch")
declare_torchvision_ops()

LENGTHS = [16, 2, 9, 5]  # the last row has no EOS: legacy argmax and first-EOS pooling differ
IDS, MASK = fx.padded_ids(LENGTHS)
PIXELS = np.random.default_rng(1).normal(size=(3, 30, 30, 3)).astype(np.float32)
SIZES = [(40, 57), (63, 34), (34, 34), (20, 25)]  # down- and upsampling, both orientations
PROMPTS = ["a photo of the dog", "", "cats on a sofa " * 8, "XYZ 123!"]  # one truncated


def _images(seed: int = 2) -> list[np.ndarray]:
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in SIZES]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  """Cached factory: (hidden_act, eos_token_id, patch_size, sharded) -> checkpoint dir."""
  made = {}

  def get(act="quick_gelu", eos=2, patch=10, sharded=False):
    key = (act, eos, patch, sharded)
    if key not in made:
      path = tmp_path_factory.mktemp("clip_" + "_".join(map(str, key)))
      made[key] = fx.make_tiny_clip_dir(path, act, eos, patch_size=patch, sharded=sharded)
    return made[key]

  return get


def _max_diff(a, b) -> float:
  return float(np.abs(np.asarray(a) - np.asarray(b)).max())


def _ours(model: CLIPModule, ids, mask, pixels) -> dict:
  @nnx.jit
  def run(m, ids, mask, px):
    out = m(ids, mask, px)
    return m.text_features(ids, mask), m.image_features(px), out

  text, image, out = run(model, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pixels))
  return {
    "text_features": text,
    "image_features": image,
    "logits_per_image": out.logits_per_image,
    "logits_per_text": out.logits_per_text,
  }


# ---------------------------------------------------------------------------------------------
# Model parity.


@pytest.mark.parametrize(
  ("act", "eos", "patch"),
  [
    ("quick_gelu", 2, 10),  # OpenAI: legacy eos_token_id=2 -> argmax pooling
    ("gelu", fx.EOS_ID, 15),  # OpenCLIP/LAION activation, first-EOS pooling
    ("gelu_pytorch_tanh", fx.EOS_ID, 10),
  ],
)
def test_parity_with_pytorch(ckpt, act, eos, patch):
  path = ckpt(act, eos, patch)
  want = fx.hf_clip_outputs(path, IDS, MASK, PIXELS)
  got = _ours(load_clip(path, progress=False), IDS, MASK, PIXELS)
  for name, ref in want.items():
    assert got[name].shape == ref.shape, name
    assert _max_diff(got[name], ref) <= 1e-4, (name, _max_diff(got[name], ref))


def test_sharded_checkpoint_and_mesh_placement(ckpt):
  path = ckpt(sharded=True)
  assert (path / "model.safetensors.index.json").is_file()
  assert (
    len(set(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"].values()))
    > 1
  )
  mesh = make_mesh({"data": -1})
  model = load_clip(path, shardings=(mesh, DEFAULT_RULES), progress=False)
  kernel = model.vision_model.layers[0].mlp.fc1.kernel
  assert isinstance(kernel[...].sharding, jax.sharding.NamedSharding)
  spec = nnx.get_partition_spec(nnx.state(model))
  assert tuple(spec["vision_model"]["layers"][0]["mlp"]["fc1"]["kernel"].get_value()) == (
    "embed", "mlp",
  )  # fmt: skip
  want = fx.hf_clip_outputs(path, IDS, MASK, PIXELS)
  got = _ours(model, IDS, MASK, PIXELS)
  assert _max_diff(got["logits_per_image"], want["logits_per_image"]) <= 1e-4


def test_save_clip_round_trip_into_transformers(tmp_path):
  from transformers import CLIPModel

  model = CLIPModule(CLIPConfig.tiny("gelu", eos_token_id=fx.EOS_ID), rngs=nnx.Rngs(3))
  save_clip(model, tmp_path)
  ours = _ours(model, IDS, MASK, PIXELS)
  theirs = fx.hf_clip_outputs(tmp_path, IDS, MASK, PIXELS)
  for name, ref in theirs.items():
    assert _max_diff(ours[name], ref) <= 1e-4, name
  assert CLIPModel.from_pretrained(str(tmp_path)).config.text_config.eos_token_id == fx.EOS_ID
  reloaded = _ours(load_clip(tmp_path, progress=False), IDS, MASK, PIXELS)
  assert _max_diff(reloaded["logits_per_text"], ours["logits_per_text"]) <= 1e-6


def test_bf16_compute_is_close(ckpt):
  path = ckpt()
  ref = _ours(load_clip(path, progress=False), IDS, MASK, PIXELS)
  model = load_clip(path, dtype=jnp.bfloat16, progress=False)
  assert model.text_model.layers[0].mlp.fc1.kernel[...].dtype == jnp.bfloat16
  got = _ours(model, IDS, MASK, PIXELS)
  for name in ("text_features", "image_features"):
    assert np.isfinite(np.asarray(got[name], np.float32)).all()
    scale = np.abs(np.asarray(ref[name])).max()
    assert _max_diff(np.asarray(got[name], np.float32), ref[name]) <= 0.05 * scale, name


# ---------------------------------------------------------------------------------------------
# The high-level wrapper: tokenizer, preprocessing, embeddings.


def test_tokenize_and_embed_text_match_transformers(ckpt):
  from transformers import AutoTokenizer, CLIPModel

  path = ckpt("gelu", fx.EOS_ID, 15)
  clip = CLIP.load(path, progress=False)
  ids, mask = clip.tokenize(PROMPTS)
  want = AutoTokenizer.from_pretrained(str(path))(
    PROMPTS, padding="max_length", max_length=16, truncation=True, return_tensors="np"
  )
  np.testing.assert_array_equal(ids, want["input_ids"])
  np.testing.assert_array_equal(mask, want["attention_mask"].astype(bool))
  assert ids.shape == (4, 16) and ids[2, -1] == fx.EOS_ID  # truncation keeps EOS
  ref = CLIPModel.from_pretrained(str(path)).eval()
  with torch.no_grad():
    feats = ref.get_text_features(
      input_ids=torch.as_tensor(ids, dtype=torch.long),
      attention_mask=torch.as_tensor(mask.astype(int)),
    ).pooler_output.numpy()
  feats /= np.linalg.norm(feats, axis=-1, keepdims=True)
  got = clip.embed_text(PROMPTS)
  assert got.shape == (4, 24) and _max_diff(got, feats) <= 1e-4
  np.testing.assert_allclose(np.linalg.norm(np.asarray(got), axis=-1), 1, atol=1e-5)


def test_preprocess_equals_clip_image_processor(ckpt):
  from transformers import CLIPImageProcessor
  from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

  path = ckpt()
  clip = CLIP.load(path, progress=False)
  assert clip.processing.shortest_edge == fx.SHORTEST_EDGE and clip.processing.crop == (30, 30)
  pil = CLIPImageProcessorPil.from_pretrained(str(path))
  fast = CLIPImageProcessor.from_pretrained(str(path))  # torchvision resize
  for image in _images():
    ours = clip.preprocess(image)
    assert ours.shape == (1, 30, 30, 3) and ours.dtype == np.float32
    want = pil(images=[image], return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
    assert _max_diff(ours, want) <= 1e-5
    # torchvision's bicubic rounds a few pixels one uint8 level (1/255/std = 0.015) apart.
    tv = fast(images=[image], return_tensors="pt")["pixel_values"].numpy().transpose(0, 2, 3, 1)
    assert _max_diff(ours, tv) <= 0.016


def test_embed_images_match_transformers(ckpt):
  from transformers import CLIPModel
  from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

  path = ckpt("gelu", fx.EOS_ID, 15)
  clip = CLIP.load(path, progress=False)
  images = _images(3)
  pixel_values = CLIPImageProcessorPil.from_pretrained(str(path))(
    images=images, return_tensors="pt"
  )
  with torch.no_grad():
    feats = CLIPModel.from_pretrained(str(path)).eval().get_image_features(**pixel_values)
  feats = feats.pooler_output.numpy()
  got = clip.embed_images(images, normalize=False)  # a list of differently sized images
  assert got.shape == (4, 24) and _max_diff(got, feats) <= 1e-4
  normed = clip.embed_images(np.stack([images[2]] * 2))  # a uint8 batch [B, H, W, 3]
  want = feats[2] / np.linalg.norm(feats[2])
  assert _max_diff(normed, np.stack([want] * 2)) <= 1e-4


def test_preprocess_jax_is_close_and_differentiable(ckpt):
  clip = CLIP.load(ckpt(), progress=False)
  for image in _images(4)[::3]:  # downsampled and upsampled (one compile each)
    x = jnp.asarray(image[None], jnp.float32) / 127.5 - 1
    approx = np.asarray(jax.jit(clip.preprocess_jax)(x))
    exact = clip.preprocess(image)
    assert approx.shape == exact.shape
    assert np.abs(approx - exact).mean() <= 0.01  # ~2/3 of one uint8 level

  fn = clip.image_features_fn()
  text = jax.jit(clip.text_features_fn())(clip.state, *map(jnp.asarray, clip.tokenize(["a dog"])))
  np.testing.assert_allclose(text, clip.embed_text(["a dog"]), atol=1e-6)
  x = jnp.asarray(_images(5)[0][None], jnp.float32) / 127.5 - 1

  @jax.jit
  def loss(x):
    return -jnp.sum(fn(clip.state, x) * text)

  grad = jax.grad(loss)(x)
  assert grad.shape == x.shape and np.isfinite(np.asarray(grad)).all()
  assert float(jnp.abs(grad).max()) > 0


# ---------------------------------------------------------------------------------------------
# Config and loading errors.


def _copy(src, dst):
  shutil.copytree(src, dst)
  return dst


def _rewrite(path, fn):
  tensors = load_file(path / "model.safetensors")
  save_file(fn(tensors), str(path / "model.safetensors"), metadata={"format": "pt"})


def test_missing_unexpected_and_misshaped_tensors(ckpt, tmp_path):
  src = ckpt()
  name = "vision_model.encoder.layers.1.mlp.fc2.bias"
  path = _copy(src, tmp_path / "missing")
  _rewrite(path, lambda t: {k: v for k, v in t.items() if k != name})
  with pytest.raises(
    CheckpointError, match=rf"model\.safetensors: 1 CLIP tensor\(s\) missing.*{name}"
  ):
    load_clip(path)
  path = _copy(src, tmp_path / "extra")
  _rewrite(path, lambda t: {**t, "text_model.extra.weight": np.ones(3, np.float32)})
  with pytest.raises(CheckpointError, match=r"unexpected tensor\(s\) \['text_model\.extra\.weight"):
    load_clip(path)
  path = _copy(src, tmp_path / "shape")
  key = "text_model.encoder.layers.0.self_attn.q_proj.weight"
  _rewrite(path, lambda t: {**t, key: np.ones((32, 31), np.float32)})
  with pytest.raises(CheckpointError, match=rf"tensor {key} has shape \[32, 31\].*\[32, 32\]"):
    load_clip(path)
  # position_ids buffers (saved by old transformers versions) are ignored.
  path = _copy(src, tmp_path / "buffers")
  ids = np.arange(16, dtype=np.int64)[None]
  _rewrite(path, lambda t: {**t, "text_model.embeddings.position_ids": ids})
  load_clip(path, progress=False)


@pytest.mark.parametrize(
  ("edit", "match"),
  [
    (lambda c: c["text_config"].update(hidden_act="relu"), r"text_config\.hidden_act='relu'"),
    (lambda c: c["vision_config"].update(hidden_act="silu"), r"vision_config\.hidden_act"),
    (lambda c: c.update(model_type="siglip"), r"model_type='siglip'"),
    (lambda c: c["text_config"].update(eos_token_id=[2, 3]), r"text_config\.eos_token_id"),
  ],
)
def test_unsupported_config_values(ckpt, tmp_path, edit, match):
  path = tmp_path / "c"
  path.mkdir()
  config = json.loads((ckpt() / "config.json").read_text())
  edit(config)
  (path / "config.json").write_text(json.dumps(config))
  with pytest.raises(CheckpointError, match=rf"config\.json: .*{match}"):
    read_clip_config(path)


def test_presets_have_the_published_sizes():
  tiny = CLIPModule(CLIPConfig.tiny(), rngs=nnx.Rngs(0))
  assert sum(x.size for x in jax.tree.leaves(nnx.state(tiny))) == CLIPConfig.tiny().num_params
  assert CLIPConfig.vit_b_32().num_params == 151_277_313  # openai/clip-vit-base-patch32
  assert CLIPConfig.vit_bigg_14().num_params == 2_539_567_105  # laion bigG: 2,539.57M
  assert CLIPConfig.vit_l_14_336().vision_config.num_positions == 24 * 24 + 1
  assert CLIPConfig.vit_h_14().text_config.hidden_act == "gelu"


def test_hub_id_downloads_weights_tokenizer_and_processor(ckpt, tmp_path, monkeypatch):
  """The online path, with huggingface_hub faked by a local 'repo' (no network)."""
  import huggingface_hub

  repo = ckpt()
  snapshot = tmp_path / "snapshot"
  snapshot.mkdir()

  def hf_hub_download(repo_id, filename, *, subfolder=None, revision=None, local_files_only=False):
    assert repo_id == "org/tiny-clip" and not local_files_only
    shutil.copy(repo / filename, snapshot / filename)
    return str(snapshot / filename)

  monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
  monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
  monkeypatch.setattr(
    huggingface_hub, "list_repo_files", lambda repo_id, revision=None: os.listdir(repo)
  )
  clip = CLIP.load("org/tiny-clip", progress=False)
  assert clip.tokenizer is not None and clip.processing.shortest_edge == fx.SHORTEST_EDGE
  want = CLIP.load(repo, progress=False).embed_text(["a dog"])
  np.testing.assert_array_equal(np.asarray(clip.embed_text(["a dog"])), np.asarray(want))
