"""Inpainting and inversion on a trained shapes cascade: success rates, PSNR and grids.

  python bench/image_edits.py --workdir=runs/shapes_long [--num=24] [--steps=25]

Inpainting: for ``--num`` renders of random single-object captions (64², the final stage), the
3×3 grid cell holding the object (dilated by 2 px) is masked and regenerated under a caption
naming another colour *and* shape at the same size and position; the pixel evaluator then looks
for the new object in that cell. Replacement only (resample 1) vs RePaint (resample 5, jump 5),
same seeds, every stage's own sampler and steps. Pixels outside the mask are exactly the render.

Inversion: the same renders under their own captions, inverted through both stages (DDIM) and
sampled back: PSNR (vs the render at each stage's size) at w = 1, at the stages' guidance w with
plain inversion, and at w with null-text inversion (10 Adam steps per sampling step).

Writes ``docs/image_edits_inpaint.png`` and ``docs/image_edits_inversion.png`` and appends the
numbers to bench/results.jsonl.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
from PIL import Image

from bench.common import machine_info, record
from imagen_jax import metrics
from imagen_jax.data import shapes as ds
from imagen_jax.edit import image_ops as ops
from imagen_jax.evaluators.shapes import analyze_image
from imagen_jax.sample.cascade import Cascade
from imagen_jax.sample.inversion import resize

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")


def _renders(num: int, size: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  items = []
  for _ in range(num):
    spec = ds.sample_spec(rng, two_object_prob=0.0)
    scene = ds.scene_from_spec(spec, rng)
    items.append((scene, ds.caption(scene)))
  images = np.stack([ds.render(s, size) for s, _ in items]).astype(np.float32) / 127.5 - 1.0
  return items, images


def _cell_mask(position: str, size: int) -> np.ndarray:
  row, col = ds.cell_index(position)
  lo = lambda k: max(int(np.floor(k * size / 3)) - 2, 0)
  hi = lambda k: min(int(np.ceil((k + 1) * size / 3)) + 2, size)
  mask = np.zeros((size, size), bool)
  mask[lo(row) : hi(row), lo(col) : hi(col)] = True
  return mask


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
  return float(10 * np.log10(4.0 / max(np.mean((a - b) ** 2), 1e-12)))  # range [-1, 1]


def _chunks(n: int, k: int):
  return [slice(i, min(n, i + k)) for i in range(0, n, k)]


def bench_inpaint(cascade, items, images, batch):
  final = cascade.stages[-1].name
  size = cascade.stages[-1].image_size
  rng = np.random.default_rng(1)
  targets, masks, cells = [], [], []
  for scene, _ in items:
    o = scene.objects[0]
    colour = rng.choice([c for c in ds.COLORS if c != o.color])
    shape = rng.choice([s for s in ds.SHAPES if s != o.shape])
    targets.append(f"a {o.size} {colour} {shape} {ds.POSITION_PHRASES[o.position]}")
    masks.append(_cell_mask(o.position, size))
    cells.append((o.position, colour, shape))
  masks = np.stack(masks)
  out, rates = {}, {}
  for name, r, j in (("replace", 1, 1), ("repaint", 5, 5)):
    t0 = time.perf_counter()
    res = []
    for sl in _chunks(len(items), batch):
      res.append(
        ops.inpaint(
          cascade, images[sl], masks[sl], targets[sl], seed=sl.start, resample=r, jump=j,
          progress=False,
        )[final]
      )  # fmt: skip
    res = np.concatenate(res)
    secs = time.perf_counter() - t0
    assert np.array_equal(res[~masks], images[~masks])
    hits = {"object": [], "color": [], "shape": [], "both": []}
    for img, (pos, colour, shape) in zip(res, cells):
      found = [d for d in analyze_image(img) if d.position == pos]
      d = found[0] if found else None
      hits["object"].append(d is not None)
      hits["color"].append(d is not None and d.color == colour)
      hits["shape"].append(d is not None and d.shape == shape)
      hits["both"].append(d is not None and d.color == colour and d.shape == shape)
    rates[name] = {k: float(np.mean(v)) for k, v in hits.items()} | {"seconds": secs}
    out[name] = res
    print(f"inpaint {name} (r={r}, j={j}): {rates[name]}")
  rows = []
  for i in range(min(8, len(items))):
    shown = np.where(masks[i][..., None], 0.6 * images[i] + 0.4, images[i])
    rows += [images[i], shown, out["replace"][i], out["repaint"][i]]
  Image.fromarray(metrics.image_grid(np.stack(rows), ncols=4)).save(
    os.path.join(DOCS, "image_edits_inpaint.png")
  )
  return rates, targets


def bench_inversion(cascade, items, images, batch, guidance):
  prompts = [c for _, c in items]
  st1 = {s.name: {"guidance": 1.0} for s in cascade.stages}
  stw = {s.name: {"guidance": guidance[s.name]} for s in cascade.stages}
  psnr = {k: {s.name: [] for s in cascade.stages} for k in ("w1", "plain_w", "null_text_w")}
  shown = {}
  t0 = time.perf_counter()
  for sl in _chunks(len(items), batch):
    p, x = prompts[sl], images[sl]
    inv1 = ops.invert(cascade, x, p, settings=st1)
    rec1 = ops.reconstruct(cascade, inv1, p, settings=st1, progress=False)
    inv = ops.invert(cascade, x, p, settings=stw, null_text=True)
    plain = cascade.generate(
      p, seed=inv.seed, settings={k: {**stw[k], **v} for k, v in inv.settings.items()},
      inputs=inv.inputs(null_text=False), progress=False,
    )[0]  # fmt: skip
    nt = ops.reconstruct(cascade, inv, p, settings=stw, progress=False)
    for key, rec in (("w1", rec1), ("plain_w", plain), ("null_text_w", nt)):
      for s in cascade.stages:
        ref = resize(x, s.image_size)
        psnr[key][s.name] += [_psnr(a, b) for a, b in zip(rec[s.name], ref)]
    if sl.start == 0:
      final = cascade.stages[-1].name
      shown = {"w1": rec1[final], "plain": plain[final], "nt": nt[final], "x": x}
  secs = time.perf_counter() - t0
  table = {k: {s: float(np.mean(v)) for s, v in d.items()} for k, d in psnr.items()}
  print(f"inversion PSNR (dB), guidance {guidance}: {table} ({secs:.0f} s)")
  rows = []
  for i in range(min(8, len(shown["x"]))):
    rows += [shown["x"][i], shown["w1"][i], shown["plain"][i], shown["nt"][i]]
  Image.fromarray(metrics.image_grid(np.stack(rows), ncols=4)).save(
    os.path.join(DOCS, "image_edits_inversion.png")
  )
  return table, secs


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True)
  p.add_argument("--num", type=int, default=24)
  p.add_argument("--batch", type=int, default=8)
  args = p.parse_args()
  cascade = Cascade.from_workdir(args.workdir, max_batch=args.batch)
  size = cascade.stages[-1].image_size
  items, images = _renders(args.num, size)
  rates, _ = bench_inpaint(cascade, items, images, args.batch)
  guidance = {s.name: s.settings.guidance for s in cascade.stages}
  table, secs = bench_inversion(cascade, items, images, args.batch, guidance)
  record(
    {
      "bench": "image_edits",
      "workdir": os.path.abspath(args.workdir),
      "num": args.num,
      "settings": {s.name: vars(s.settings) for s in cascade.stages},
      "inpaint": rates,
      "inversion_psnr_db": table,
      "inversion_seconds": secs,
      **machine_info(),
    }
  )


if __name__ == "__main__":
  main()
