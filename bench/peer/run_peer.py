"""The imagen-pytorch side of ``bench/vs_imagen_pytorch.py``; runs in ``bench/peer/.venv-peer``.

  bench/peer/.venv-peer/bin/python bench/peer/run_peer.py '<json spec>'

The spec names a task and the model settings chosen by ``vs_imagen_pytorch.py``:

* ``{"task": "params", "unets": [...], "image_sizes"?}``: parameter count of each
  ``Unet(**kwargs)`` and, with ``image_sizes``, its forward FLOPs per image
  (``torch.utils.flop_counter``, 2 per multiply-accumulate);
* ``{"task": "train", "unet": {...}, "image_size", "batch", "text_length", "text_dim", "steps",
  "warmup", ...}``: one U-Net's training step — ``Imagen.forward`` (noise, loss with min-SNR
  weighting), ``backward``, global-norm clipping, Adam, EMA update; the same work as imagen-jax's
  train step. Warmup steps are untimed; every timed step ends with the loss on the host;
* ``{"task": "sample", "unets": [{...}, {...}], "image_sizes", "batch", "steps", "cond_scale",
  ...}``: ``Imagen.sample`` through both stages with classifier-free guidance at ``steps`` steps
  per stage, text embeddings passed directly. One untimed warmup run, then timed runs;
* ``{"task": "matmul", "n", "repeats"}``: the best fp32 GFLOP/s of an ``n × n × n`` ``torch.mm``
  on this process's cores (the denominator of the bench's CPU MFU).

Prints one JSON line (the last line of stdout) with times in seconds.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import shims

shims.apply()

import torch  # noqa: E402
from imagen_pytorch import Imagen, Unet  # noqa: E402


def _unet(kwargs: dict) -> Unet:
  kw = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
  return Unet(**kw)


def _text(batch: int, length: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
  g = torch.Generator().manual_seed(0)
  emb = torch.randn(batch, length, dim, generator=g)
  mask = torch.arange(length)[None, :] < max(length // 2, 1)  # half the tokens valid, like ours
  return emb, mask.expand(batch, length).clone()


def _num_params(module: torch.nn.Module) -> int:
  return sum(p.numel() for p in module.parameters())


def task_params(spec: dict) -> dict:
  """Parameter counts, and forward FLOPs per image of each U-Net when ``image_sizes`` is given."""
  unets = [_unet(u) for u in spec["unets"]]
  out = {"params": [_num_params(u) for u in unets]}
  if "image_sizes" in spec:
    from torch.utils.flop_counter import FlopCounterMode

    imagen = Imagen(
      unets=tuple(unets),
      image_sizes=tuple(spec["image_sizes"]),
      text_embed_dim=spec["text_dim"],
      auto_normalize_img=False,
    )
    emb, mask = _text(1, spec["text_length"], spec["text_dim"])
    out["fwd_flops_per_image"] = []
    for i, size in enumerate(spec["image_sizes"]):
      images = torch.rand(1, 3, size, size) * 2 - 1
      with torch.no_grad(), FlopCounterMode(display=False) as counter:
        imagen(images, text_embeds=emb, text_masks=mask, unet_number=i + 1)
      out["fwd_flops_per_image"].append(counter.get_total_flops())
  return out


def task_train(spec: dict) -> dict:
  from ema_pytorch import EMA

  torch.manual_seed(0)
  unets = [_unet(u) for u in spec["unets"]]
  n = spec.get("unet_number", 1)
  imagen = Imagen(
    unets=tuple(unets),
    image_sizes=tuple(spec["image_sizes"]),
    timesteps=spec.get("timesteps", 1000),
    cond_drop_prob=0.1,
    text_embed_dim=spec["text_dim"],
    auto_normalize_img=False,  # images already in [-1, 1], as ours
  )
  unet = imagen.unets[n - 1]
  opt = torch.optim.Adam(unet.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8)
  ema = EMA(unet, beta=0.9999, update_after_step=0, update_every=1)
  b, size = spec["batch"], spec["image_sizes"][n - 1]
  g = torch.Generator().manual_seed(1)
  images = torch.rand(b, 3, size, size, generator=g) * 2 - 1
  emb, mask = _text(b, spec["text_length"], spec["text_dim"])
  imagen.train()

  def step() -> float:
    loss = imagen(images, text_embeds=emb, text_masks=mask, unet_number=n)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    ema.update()
    return float(loss)

  # Forward FLOPs of the loss as torch counts them (2 per MAC for matmuls and convs).
  from torch.utils.flop_counter import FlopCounterMode

  with torch.no_grad(), FlopCounterMode(display=False) as counter:
    imagen(images, text_embeds=emb, text_masks=mask, unet_number=n)
  fwd_flops = counter.get_total_flops()
  t0 = time.perf_counter()
  step()
  first_s = time.perf_counter() - t0
  for _ in range(spec.get("warmup", 1) - 1):
    step()
  times = []
  for _ in range(spec["steps"]):
    t0 = time.perf_counter()
    step()
    times.append(time.perf_counter() - t0)
  return {
    "params": _num_params(unet),
    "fwd_flops": fwd_flops,
    "first_step_s": first_s,
    "step_s_median": statistics.median(times),
    "step_s_min": min(times),
    "step_times": times,
  }


def task_sample(spec: dict) -> dict:
  torch.manual_seed(0)
  unets = [_unet(u) for u in spec["unets"]]
  imagen = Imagen(
    unets=tuple(unets),
    image_sizes=tuple(spec["image_sizes"]),
    timesteps=spec["steps"],  # steps per stage at sampling time
    cond_drop_prob=0.1,
    text_embed_dim=spec["text_dim"],
    lowres_sample_noise_level=spec.get("aug_level", 0.2),
  )
  imagen.eval()
  emb, mask = _text(spec["batch"], spec["text_length"], spec["text_dim"])

  def run():
    t0 = time.perf_counter()
    out = imagen.sample(
      text_embeds=emb,
      text_masks=mask,
      cond_scale=spec["cond_scale"],
      batch_size=spec["batch"],
      use_tqdm=False,
    )
    assert out.shape[-1] == spec["image_sizes"][-1], out.shape
    return time.perf_counter() - t0

  first_s = run()  # warmup (allocator, oneDNN primitive caches), excluded
  times = [run() for _ in range(spec.get("repeats", 1))]
  return {
    "params": [_num_params(u) for u in imagen.unets],
    "first_run_s": first_s,
    "run_s_median": statistics.median(times),
    "run_s_min": min(times),
    "run_times": times,
  }


def task_matmul(spec: dict) -> dict:
  n = int(spec["n"])
  a, b = torch.randn(n, n), torch.randn(n, n)
  torch.mm(a, b)  # warmup
  times = []
  for _ in range(int(spec["repeats"])):
    t0 = time.perf_counter()
    torch.mm(a, b)
    times.append(time.perf_counter() - t0)
  return {"matmul_gflops_per_s": 2 * n**3 / min(times) / 1e9}


def main() -> None:
  spec = json.loads(sys.argv[1])
  if "threads" in spec:
    torch.set_num_threads(int(spec["threads"]))
  result = {
    "params": task_params,
    "train": task_train,
    "sample": task_sample,
    "matmul": task_matmul,
  }[spec["task"]](spec)
  result.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
  print(json.dumps(result))


if __name__ == "__main__":
  main()
