"""FID Inception, FID and KID against their oracles: pytorch-fid and torchmetrics (needs torch).

The real FID weights cannot be downloaded here, so pytorch-fid's own FID InceptionV3 is built
with random weights (and random BatchNorm statistics, so eval-mode BN is exercised), saved as a
``.pth``, and loaded into the JAX model. Every JAX forward uses batch 2 at 299², so the network
compiles once for the whole module.
"""

from __future__ import annotations

import warnings

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from imagen_jax.evaluators import fid
from imagen_jax.models import inception as inc

try:
  from tests.torch_oracles import pytorch_fid_inception, pytorch_fid_score, torchmetrics_image
except ImportError:
  from torch_oracles import pytorch_fid_inception, pytorch_fid_score, torchmetrics_image

torch = pytest.importorskip("torch")

BATCH = 2


def _randomize(state: dict, seed: int = 0) -> dict:
  """He-normal convs (activations stay O(1) through 94 layers) and non-trivial BN stats."""
  g = torch.Generator().manual_seed(seed)
  for k, v in state.items():
    if k.endswith("conv.weight"):
      v.copy_(torch.randn(v.shape, generator=g) * (2 / v[0].numel()) ** 0.5)
    elif k.endswith(("bn.weight", "running_var")):
      v.copy_(torch.rand(v.shape, generator=g) + 0.5)
    elif k.endswith(("bn.bias", "running_mean")):
      v.copy_(torch.randn(v.shape, generator=g) * 0.1)
  return state


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
  """pytorch-fid's ``InceptionV3([3])`` with random weights, and those weights as .pth/.safetensors.

  ``fid_inception_v3()`` downloads the weights with ``load_state_dict_from_url``; it is patched to
  return the state dict of the model being built (recorded from ``_inception_v3``), randomised.
  """
  pfi = pytorch_fid_inception()
  built = {}

  def record(*args, **kwargs):
    built["model"] = original(*args, **kwargs)
    return built["model"]

  original = pfi._inception_v3
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(pfi, "_inception_v3", record)
    mp.setattr(
      pfi, "load_state_dict_from_url", lambda *a, **k: _randomize(built["model"].state_dict())
    )
    net = pfi.InceptionV3([3], use_fid_inception=True).eval()
  state = {k: v.clone() for k, v in built["model"].state_dict().items()}
  d = tmp_path_factory.mktemp("fid_weights")
  torch.save(state, d / "pt_inception.pth")
  st = d / "inception.safetensors"
  assert inc.main([str(d / "pt_inception.pth"), str(st)]) == 0  # the one-off converter
  return {"net": net, "state": state, "pth": d / "pt_inception.pth", "safetensors": st}


@pytest.fixture(scope="module")
def model(oracle):
  return inc.load_fid_inception(oracle["pth"])


def _torch_pool3(net, images: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    return net(x)[0][:, :, 0, 0].numpy()


@pytest.mark.parametrize("size", [(64, 48), (320, 320), (37, 1000), (299, 299)])
def test_resize_matches_torch_interpolate(size):
  F = torch.nn.functional
  x = np.random.default_rng(0).random((1, *size, 3), dtype=np.float32)
  ref = F.interpolate(torch.from_numpy(x.transpose(0, 3, 1, 2)), size=(299, 299), mode="bilinear",
                      align_corners=False).numpy().transpose(0, 2, 3, 1)  # fmt: skip
  np.testing.assert_allclose(inc.resize_bilinear(x), ref, rtol=0, atol=2.5e-7)  # <= 2 ulp
  np.testing.assert_allclose(np.asarray(inc.resize_bilinear(jnp.asarray(x))), ref, atol=5e-7)


def test_pool3_matches_pytorch_fid(oracle, model):
  # One JAX batch holding both sizes (each image is resized on its own); torch needs one each.
  rng = np.random.default_rng(1)
  images = [rng.random((64, 48, 3), dtype=np.float32), rng.random((320, 320, 3), dtype=np.float32)]
  ref = np.concatenate([_torch_pool3(oracle["net"], im[None]) for im in images])
  ours = inc.extract_features(model, images, batch_size=BATCH)
  err, peak = np.abs(ours - ref).max(), np.abs(ref).max()
  assert peak > 1.0 and ref.std() > 0.1, "random features degenerate: the test would be weak"
  assert err <= 1e-4, f"max-abs error {err:.2e} (features up to {peak:.1f})"


def test_safetensors_matches_pth(oracle, model):
  from_st = inc.state_dict(inc.load_fid_inception(oracle["safetensors"]))
  assert from_st.keys() == inc.state_dict(model).keys()
  for name, arr in from_st.items():
    np.testing.assert_array_equal(arr, oracle["state"][name].numpy(), err_msg=name)


def test_weight_errors(oracle, tmp_path):
  base = {k: v.numpy() for k, v in oracle["state"].items()}
  name = "Mixed_6c.branch7x7_2.conv.weight"
  with pytest.raises(inc.InceptionWeightsError, match=f"{name} is missing"):
    inc.load_fid_inception({k: v for k, v in base.items() if k != name})
  with pytest.raises(inc.InceptionWeightsError, match=rf"{name} has shape \[160, 160, 7, 1\]"):
    inc.load_fid_inception({**base, name: base[name].transpose(0, 1, 3, 2)})
  with pytest.raises(inc.InceptionWeightsError, match="1000 classes"):
    inc.load_fid_inception({**base, "fc.weight": np.zeros((1000, 2048), np.float32)})
  with pytest.raises(inc.InceptionWeightsError, match=r"unexpected tensor\(s\) \['AuxLogits"):
    inc.load_fid_inception({**base, "AuxLogits.fc.weight": np.zeros((1, 1), np.float32)})
  with pytest.raises(inc.InceptionWeightsError, match="file not found.*pytorch-fid"):
    inc.load_fid_inception(tmp_path / "nope.pth")
  # A file: the message names the file and the tensor.
  from safetensors.numpy import save_file

  bad = tmp_path / "bad.safetensors"
  save_file({k: v for k, v in base.items() if k != name}, str(bad))
  with pytest.raises(inc.InceptionWeightsError, match=f"bad.safetensors: tensor {name} is missing"):
    inc.load_fid_inception(bad)


def _stats(n: int, d: int, rng) -> tuple[np.ndarray, np.ndarray]:
  f = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + rng.normal(size=d)
  return f.mean(0), np.cov(f, rowvar=False)


@pytest.mark.parametrize("n", [500, 40])  # 40 < 64: both covariances are singular
def test_frechet_distance_matches_pytorch_fid(n):
  pfs = pytorch_fid_score()
  rng = np.random.default_rng(n)
  (m1, s1), (m2, s2) = _stats(n, 64, rng), _stats(n, 64, rng)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # scipy's sqrtm warns on singular products
    ref = pfs.calculate_frechet_distance(m1, s1, m2, s2)
  ours = fid.frechet_distance(m1, s1, m2, s2)
  assert isinstance(ours, float)
  np.testing.assert_allclose(ours, ref, rtol=1e-6)
  assert abs(fid.frechet_distance(m1, s1, m1, s1)) < 1e-6 * np.trace(s1)


def test_kid_matches_torchmetrics():
  tm_kid = pytest.importorskip("torchmetrics.image.kid")
  rng = np.random.default_rng(0)
  f1 = rng.normal(size=(30, 64)) + 0.3
  f2 = rng.normal(size=(25, 64)) * 1.2
  t = lambda a: torch.from_numpy(np.asarray(a, np.float64))
  # Same subsets for both: torchmetrics' poly_mmd on our index sets.
  ref = [tm_kid.poly_mmd(t(f1[i]), t(f2[j])).item() for i, j in fid.kid_subsets(30, 25, 7, 20)]
  mean, std = fid.kid(f1, f2, subsets=7, subset_size=20)
  np.testing.assert_allclose([mean, std], [np.mean(ref), np.std(ref)], rtol=1e-6)
  # The metric class end to end (one subset of all rows: the MMD is permutation invariant).
  torchmetrics_image()
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    metric = tm_kid.KernelInceptionDistance(
      feature=torch.nn.Identity(), subsets=1, subset_size=25
    ).double()
    metric.update(t(f1[:25]), real=True)
    metric.update(t(f2), real=False)
    ref_mean, ref_std = (v.item() for v in metric.compute())
    ours = fid.kid(f1[:25], f2, subsets=1, subset_size=25)
  np.testing.assert_allclose(ours, [ref_mean, ref_std], rtol=1e-6, atol=1e-12)


def test_stats_npz_roundtrip_and_pytorch_fid_files(tmp_path):
  rng = np.random.default_rng(0)
  feats = rng.normal(size=(20, 8)).astype(np.float32)
  stats = fid.FeatureStats.from_features(feats, keep_features=True)
  loaded = fid.FeatureStats.load(stats.save(tmp_path / "s.npz"))
  np.testing.assert_array_equal(loaded.mu, stats.mu)
  np.testing.assert_array_equal(loaded.sigma, stats.sigma)
  np.testing.assert_array_equal(loaded.features, feats)
  assert loaded.count == 20
  # pytorch-fid reads our file (extra keys ignored) and we read its format (mu, sigma only).
  path = str(tmp_path / "s.npz")
  mu, _ = pytorch_fid_score().compute_statistics_of_path(path, None, 1, 8, "cpu")
  np.testing.assert_array_equal(mu, stats.mu)
  np.savez(tmp_path / "theirs.npz", mu=stats.mu.astype(np.float32), sigma=stats.sigma)
  theirs = fid.FeatureStats.load(tmp_path / "theirs.npz")
  assert theirs.count is None and theirs.features is None
  np.testing.assert_allclose(theirs.mu, stats.mu, rtol=1e-6)
  np.savez(tmp_path / "other.npz", mean=stats.mu)
  with pytest.raises(ValueError, match="missing"):
    fid.FeatureStats.load(tmp_path / "other.npz")
  with pytest.raises(ValueError, match="at least 2 images"):
    fid.FeatureStats.from_features(feats[:1])
  with pytest.warns(UserWarning, match="rank <= 4 < 8"):
    fid.FeatureStats.from_features(feats[:5])


def test_folder_stats_equal_array_stats_and_evaluator(oracle, model, tmp_path):
  rng = np.random.default_rng(3)
  sizes = [(40, 56), (31, 47), (299, 299)]
  images = [rng.integers(0, 256, (*s, 3), dtype=np.uint8) for s in sizes]
  folder = tmp_path / "ref"
  folder.mkdir()
  for i, im in enumerate(images):
    Image.fromarray(im).save(folder / f"{i:02d}.png")
  (folder / "notes.txt").write_text("not an image")
  with pytest.warns(UserWarning, match="rank"):
    ref = fid.reference_stats(folder, model, tmp_path / "ref.npz", batch_size=BATCH)
    from_array = fid.FeatureStats.from_features(
      fid.features_from_array(model, images, batch_size=BATCH)
    )
  np.testing.assert_allclose(ref.mu, from_array.mu, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(ref.sigma, from_array.sigma, rtol=1e-6, atol=1e-6)
  assert ref.features.shape == (3, 2048) and ref.count == 3

  # The evaluator scores float samples in [-1, 1]; the same images quantize back exactly.
  same_size = np.stack([im[:31, :40] for im in images[:2]]).astype(np.float32) / 127.5 - 1
  evaluator = fid.FIDEvaluator(oracle["safetensors"], tmp_path / "ref.npz", batch_size=BATCH)
  with pytest.warns(UserWarning):
    out = evaluator.run(same_size)
  assert evaluator.name == "fid" and set(out) == {"fid", "kid", "kid_std"}
  assert all(np.isfinite(v) for v in out.values()) and out["fid"] > 0
  ref.features = None
  ref.save(tmp_path / "no_feats.npz")
  no_kid = fid.FIDEvaluator(oracle["safetensors"], tmp_path / "no_feats.npz", batch_size=BATCH)
  with pytest.warns(UserWarning):
    assert set(no_kid.run(same_size)) == {"fid"}
  with pytest.raises(ValueError, match="at least 2 images"):
    evaluator.run(same_size[:1])
