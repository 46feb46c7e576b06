"""DeepFloyd IF's U-Net in JAX against diffusers' PyTorch ``UNet2DConditionModel`` (the oracle):
output parity for tiny stage I / stage II models with every parameter randomised, fp16 variant,
sharded checkpoints, ``save_if_unet`` round trips, strict loading errors, unsupported configs,
preset parameter counts (meta device) and bf16 compute.
"""

from __future__ import annotations

import copy
import json
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from imagen_jax.models.hf_loading import abstract_params
from imagen_jax.models.if_loading import CheckpointError, load_if_unet, save_if_unet
from imagen_jax.models.if_unet import PRESETS, IFUNet, IFUNetConfig, count_params
from imagen_jax.sharding import DEFAULT_RULES, make_mesh

try:
  from tests.torch_oracles import declare_torchvision_ops
except ImportError:
  from torch_oracles import declare_torchvision_ops

torch = pytest.importorskip("torch")
declare_torchvision_ops()
diffusers = pytest.importorskip("diffusers")
from diffusers.models.attention_processor import AttnAddedKVProcessor2_0  # noqa: E402

STAGE_I = dict(
  in_channels=3, out_channels=6, sample_size=32, layers_per_block=1,
  block_out_channels=(32, 64, 96),
  down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D",
                    "SimpleCrossAttnDownBlock2D"),
  up_block_types=("SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
  mid_block_type="UNetMidBlock2DSimpleCrossAttn", attention_head_dim=16, cross_attention_dim=64,
  encoder_hid_dim=48, encoder_hid_dim_type="text_proj", addition_embed_type="text",
  addition_embed_type_num_heads=4, act_fn="gelu", time_embedding_act_fn="gelu",
  resnet_time_scale_shift="scale_shift", resnet_skip_time_act=True,
  resnet_out_scale_factor=1 / 0.7071, norm_num_groups=16, cross_attention_norm="group_norm",
)  # fmt: skip
# Stage II as convert_if.py builds it: noise-level class embedding, cross-attention only (no
# image self-attention), per-block layers, mid scale 1/sqrt(2), explicit time_embedding_dim.
STAGE_II = dict(
  STAGE_I, in_channels=6, layers_per_block=(1, 2, 1), class_embed_type="timestep",
  only_cross_attention=True, mid_block_scale_factor=1 / 0.7071, time_embedding_dim=96,
  down_block_types=("ResnetDownsampleBlock2D", "ResnetDownsampleBlock2D",
                    "SimpleCrossAttnDownBlock2D"),
  up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D", "ResnetUpsampleBlock2D"),
)  # fmt: skip
B, L, HW = 3, 7, 32
TIMESTEPS = np.array([3.7, 500.0, 999.0], np.float32)  # fractional and integer
NOISE_LEVEL = np.array([250, 0, 999], np.int64)
MASK = np.arange(L)[None, :] < np.array([[L], [4], [1]])  # row 0 unpadded, rows 1-2 padded
TOL = 1e-4


class _CrossOnlyMaskProcessor(AttnAddedKVProcessor2_0):
  """diffusers pads the text mask by the image length even without image keys
  (``only_cross_attention``), which crashes SDPA; this oracle skips that padding only."""

  def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kw):
    if attn.only_cross_attention and attention_mask is not None:
      prepare = attn.prepare_attention_mask
      attn.prepare_attention_mask = lambda m, _t, b, out_dim=3: prepare(m, m.shape[-1], b, out_dim)
      try:
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask)
      finally:
        del attn.prepare_attention_mask
    return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask)


def _torch_unet(cfg: dict, seed: int):
  torch.manual_seed(seed)
  model = diffusers.UNet2DConditionModel(**cfg).eval()
  with torch.no_grad():  # perturb everything (norms, biases, zero-init layers) so no bug hides
    for p in model.parameters():
      scale = 0.5 * float(p.std()) if p.ndim >= 2 and p.numel() > 1 else 0.1
      p.add_(torch.randn_like(p) * scale)
  model.set_attn_processor(_CrossOnlyMaskProcessor())
  return model


def _inputs(cfg: dict, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  return dict(
    x=rng.normal(size=(B, HW, HW, cfg["in_channels"])).astype(np.float32),
    t=TIMESTEPS,
    text=rng.normal(size=(B, L, cfg["encoder_hid_dim"])).astype(np.float32),
    mask=MASK,
    labels=NOISE_LEVEL if cfg.get("class_embed_type") else None,
  )


def _torch_out(model, inp: dict, mask: bool = True) -> np.ndarray:
  """diffusers' output (NHWC); ``mask=False`` passes no encoder_attention_mask."""
  with torch.no_grad():
    out = model(
      torch.from_numpy(inp["x"]).permute(0, 3, 1, 2),
      torch.from_numpy(inp["t"]),
      torch.from_numpy(inp["text"]),
      encoder_attention_mask=torch.from_numpy(inp["mask"]).float() if mask else None,
      class_labels=None if inp["labels"] is None else torch.from_numpy(inp["labels"]),
    ).sample
  return out.permute(0, 2, 3, 1).numpy()


@partial(jax.jit, static_argnums=0)
def _jax_forward(graphdef, params, x, t, text, mask, labels):
  return nnx.merge(graphdef, params)(x, t, text, mask, labels)


def _jax_out(loaded, inp: dict, graphdef=None) -> np.ndarray:
  """The JAX output; ``graphdef`` (an equal one from another load) reuses its compilation."""
  labels = None if inp["labels"] is None else jnp.asarray(inp["labels"])
  args = (inp["x"], inp["t"], inp["text"], jnp.asarray(inp["mask"]), labels)
  out = _jax_forward(graphdef or loaded.graphdef, loaded.params, *args)
  return np.asarray(out, np.float32)


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
  return float(np.abs(a - b).max() / np.abs(b).max())


def _make_case(stage: str, root):
  """(config dict, torch model, inputs, torch output, checkpoint root, loaded JAX model)."""
  cfg = STAGE_I if stage == "stage_I" else STAGE_II
  model = _torch_unet(cfg, seed=1 if stage == "stage_I" else 2)
  model.save_pretrained(root / "unet")  # pipeline layout: <root>/unet/config.json
  inp = _inputs(cfg)
  return cfg, model, inp, _torch_out(model, inp), root, load_if_unet(root)


# One test per stage: each JAX compile of the U-Net costs seconds on CPU, and a module-scoped
# fixture would be rebuilt (and recompiled) by every pytest-xdist worker that runs a share of it.
@pytest.mark.parametrize("stage", ["stage_I", "stage_II"])
def test_diffusers_parity_variants_round_trip(stage, tmp_path):
  cfg, model, inp, expected, root, loaded = _make_case(stage, tmp_path / "ckpt")
  assert loaded.config.class_embed_type == cfg.get("class_embed_type")
  got = _jax_out(loaded, inp)
  assert got.shape == (B, HW, HW, 6)
  assert _rel_err(got, expected) < TOL

  # Padding matters (the mask reaches every attention); an all-true mask equals no mask.
  unmasked = _torch_out(model, inp, mask=False)
  assert _rel_err(unmasked, expected) > 1e-3
  assert _rel_err(_jax_out(loaded, {**inp, "mask": np.ones_like(MASK)}), unmasked) < TOL

  # Sharded fp32 checkpoint (index + several files): bit-identical parameters.
  model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
  assert (tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json").is_file()
  jax.tree.map(np.testing.assert_array_equal, load_if_unet(tmp_path / "sharded").params,
               loaded.params)  # fmt: skip

  # fp16 variant: the numbers of the fp16-rounded torch model, as tight as fp32.
  half = copy.deepcopy(model).half()
  half.save_pretrained(tmp_path / "half", variant="fp16")
  with pytest.raises(CheckpointError, match="variant='fp16'"):
    load_if_unet(tmp_path / "half")
  got16 = _jax_out(load_if_unet(tmp_path / "half", variant="fp16"), inp, loaded.graphdef)
  assert _rel_err(got16, _torch_out(half.float(), inp)) < TOL
  assert _rel_err(got16, expected) < 2e-2  # fp16 weights vs fp32 weights

  # save_if_unet: diffusers loads it to the same numbers, and so do we (no unet/ subfolder).
  save_if_unet(tmp_path / "saved", loaded.config, loaded.params)
  reloaded = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "saved").eval()
  reloaded.set_attn_processor(_CrossOnlyMaskProcessor())
  np.testing.assert_allclose(_torch_out(reloaded, inp), expected, rtol=0, atol=1e-6)
  saved_cfg = json.loads((tmp_path / "saved" / "config.json").read_text())
  assert saved_cfg["_class_name"] == "UNet2DConditionModel"
  jax.tree.map(np.testing.assert_array_equal, load_if_unet(tmp_path / "saved").params,
               loaded.params)  # fmt: skip

  # Placed by logical axis names on a mesh (one CPU device here): same values.
  on_mesh = load_if_unet(root, mesh=make_mesh({"data": -1}), rules=DEFAULT_RULES)
  jax.tree.map(np.testing.assert_array_equal, on_mesh.params, loaded.params)

  _check_strict_errors(root, tmp_path / "broken")


def test_bf16_compute_close_to_fp32(tmp_path):
  """bf16 compute (fp32 norms/softmax) of a two-level IF U-Net stays near diffusers' fp32 output.
  Two levels, not three: XLA:CPU compiles the bf16 network ~3x slower than the fp32 one."""
  cfg = dict(
    STAGE_I, block_out_channels=(32, 64), down_block_types=STAGE_I["down_block_types"][:2],
    up_block_types=STAGE_I["up_block_types"][1:],
  )  # fmt: skip
  model = _torch_unet(cfg, seed=3)
  model.save_pretrained(tmp_path)
  inp = _inputs(cfg)
  loaded = load_if_unet(tmp_path, dtype=jnp.bfloat16)
  assert {x.dtype for x in jax.tree.leaves(loaded.params)} == {jnp.dtype(jnp.bfloat16)}
  got = _jax_out(loaded, inp)
  assert got.dtype == np.float32 and np.isfinite(got).all()
  assert _rel_err(got, _torch_out(model, inp)) < 0.05


def _check_strict_errors(root, tmp_path) -> None:
  """A missing, an unexpected and a misshaped tensor are each named."""
  tensors = load_file(root / "unet" / "diffusion_pytorch_model.safetensors")
  config = (root / "unet" / "config.json").read_text()

  def write(name: str, t: dict) -> None:
    (tmp_path / name).mkdir(parents=True)
    (tmp_path / name / "config.json").write_text(config)
    save_file(t, str(tmp_path / name / "diffusion_pytorch_model.safetensors"))

  key = "mid_block.attentions.0.to_q.weight"
  write("missing", {k: v for k, v in tensors.items() if k != key})
  with pytest.raises(CheckpointError, match=f"missing.*{key}"):
    load_if_unet(tmp_path / "missing")
  write("unexpected", {**tensors, "extra.weight": np.zeros(3, np.float32)})
  with pytest.raises(CheckpointError, match="unexpected.*extra.weight"):
    load_if_unet(tmp_path / "unexpected")
  write("shape", {**tensors, key: tensors[key][:, :-1].copy()})
  with pytest.raises(CheckpointError, match=f"{key} has shape"):
    load_if_unet(tmp_path / "shape")


def test_class_labels_required_iff_configured():
  def abstract(name: str) -> IFUNet:  # shapes only: the check runs before any computation
    graphdef, flat, _ = abstract_params(lambda r: IFUNet(IFUNetConfig.from_preset(name), rngs=r))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))

  x, t, text = jnp.zeros((1, 16, 16, 6)), jnp.zeros((1,)), jnp.zeros((1, 3, 48))
  with pytest.raises(ValueError, match="class_labels is required"):
    abstract("tiny_sr")(x, t, text)
  with pytest.raises(ValueError, match="class_labels was given"):
    abstract("tiny")(x[..., :3], t, text, class_labels=t)


@pytest.mark.parametrize(
  ("key", "value"),
  [
    ("down_block_types", ["CrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D",
                          "SimpleCrossAttnDownBlock2D"]),
    ("attention_type", "gated"),
    ("time_cond_proj_dim", 8),
    ("class_embed_type", "projection"),
    ("addition_embed_type", "text_image"),
    ("mid_block_type", "UNetMidBlock2DCrossAttn"),
  ],
)  # fmt: skip
def test_unsupported_config_names_the_field(key, value, tmp_path):
  raw = {**IFUNetConfig(**STAGE_I).to_diffusers(), key: value}
  with pytest.raises(ValueError, match=key):
    IFUNetConfig.from_diffusers(raw)
  (tmp_path / "config.json").write_text(json.dumps(raw))
  with pytest.raises(CheckpointError, match=f"config.json.*{key}"):
    load_if_unet(tmp_path)


def test_config_round_trip_and_bookkeeping_keys():
  cfg = IFUNetConfig(**STAGE_II)
  raw = {**cfg.to_diffusers(), "_diffusers_version": "0.16.0", "_name_or_path": "x"}
  assert IFUNetConfig.from_diffusers(raw) == cfg
  with pytest.raises(ValueError, match="unknown UNet2DConditionModel config key 'foo'"):
    IFUNetConfig.from_diffusers({**raw, "foo": 1})


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_parameter_counts_match_diffusers(name):
  cfg = IFUNetConfig.from_preset(name)
  with torch.device("meta"):
    reference = diffusers.UNet2DConditionModel(**cfg.to_diffusers())
  assert count_params(cfg) == sum(p.numel() for p in reference.parameters())
