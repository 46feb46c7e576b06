"""CLIP guidance on the shapes cascade, with tiny CLIPs trained here on shapes renders.

  python bench/clip_guidance.py --workdir=runs/shapes [--num=32] [--scales=0,100,300,1000]

1. Trains two tiny CLIPs (ViT 32², patch 4; a word-level tokenizer of the shapes grammar) with the
   CLIP loss on random renders and their captions, different seeds: one guides, the other scores
   (a model scored by the CLIP that guided it would be graded on its own exam).
2. Samples ``--num`` held-out single-object prompts through the cascade at each CLIP guidance
   scale (base stage guided, as GLIDE; same seeds), and reports the pixel evaluator's alignment
   and the scoring CLIP's CLIP score of the final stage, and the time per image.

Writes ``docs/clip_guidance.png`` (one row per scale) and appends the numbers to
bench/results.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from PIL import Image

from bench.common import machine_info, record
from imagen_jax import metrics
from imagen_jax.clip import CLIP, ImageProcessing
from imagen_jax.data import shapes as ds
from imagen_jax.evaluators.clip_score import clip_score, pair_scores
from imagen_jax.evaluators.shapes import ShapesAlignmentEvaluator
from imagen_jax.models.clip import CLIPConfig, CLIPModule, CLIPTextConfig, CLIPVisionConfig
from imagen_jax.models.clip_loading import save_clip
from imagen_jax.sample.cascade import Cascade
from imagen_jax.sample.clip_guidance import ClipGuidance

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _tokenizer_dir(path: str, max_length: int) -> int:
  """A word-level tokenizer of the shapes grammar (``tokenizer.json``); returns the vocab size."""
  from tokenizers import Tokenizer, models, pre_tokenizers, processors
  from transformers import PreTrainedTokenizerFast

  rng = np.random.default_rng(0)
  words = sorted({w for _ in range(4000) for w in ds.caption(ds.sample_spec(rng)).split()})
  vocab = {w: i for i, w in enumerate([*words, BOS, EOS])}
  tok = Tokenizer(models.WordLevel(vocab, unk_token=EOS))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.post_processor = processors.TemplateProcessing(
    single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])]
  )
  fast = PreTrainedTokenizerFast(
    tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=EOS, model_max_length=max_length
  )
  fast.save_pretrained(path)
  return len(vocab)


def train_clip(path: str, seed: int, steps: int, batch: int = 128) -> CLIP:
  """Trains a tiny CLIP on shapes renders (64², the cascade output) and saves it to ``path``."""
  vocab = _tokenizer_dir(path, 16)
  config = CLIPConfig(
    text_config=CLIPTextConfig(
      vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
      num_attention_heads=4, max_position_embeddings=16, hidden_act="gelu",
      bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1,
    ),
    vision_config=CLIPVisionConfig(
      hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
      image_size=32, patch_size=4, hidden_act="gelu",
    ),
    projection_dim=64,
  )  # fmt: skip
  processing = ImageProcessing.for_vision(config.vision_config)
  model = CLIPModule(config, rngs=nnx.Rngs(seed))
  clip = CLIP(model, None, processing, source=path)
  from transformers import AutoTokenizer

  clip.tokenizer = AutoTokenizer.from_pretrained(path)
  source = ds.ShapesSource(seed=100 + seed, image_size=64, two_object_prob=0.3)
  opt = optax.adamw(optax.warmup_cosine_decay_schedule(0, 1e-3, 50, steps), weight_decay=0.05)
  state = clip.state
  opt_state = opt.init(state)

  @jax.jit
  def step(state, opt_state, ids, mask, pixels):
    def loss_fn(state):
      out = nnx.merge(clip.graphdef, state)(ids, mask, pixels)
      labels = jnp.arange(ids.shape[0])
      ce = optax.softmax_cross_entropy_with_integer_labels
      return 0.5 * (ce(out.logits_per_image, labels) + ce(out.logits_per_text, labels)).mean()

    loss, grads = jax.value_and_grad(loss_fn)(state)
    updates, opt_state = opt.update(grads, opt_state, state)
    return optax.apply_updates(state, updates), opt_state, loss

  for i in range(steps):
    items = [source[i * batch + j] for j in range(batch)]
    ids, mask = clip.tokenize([it["caption"] for it in items])
    pixels = clip.preprocess(np.stack([it["image"] for it in items]))
    state, opt_state, loss = step(state, opt_state, ids, mask, pixels)
    if i % 100 == 0 or i == steps - 1:
      print(f"  clip seed {seed} step {i}: loss {float(loss):.3f}")
  nnx.update(model, state)
  save_clip(model, path)
  return CLIP.load(path, progress=False)


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--workdir", default="runs/shapes")
  p.add_argument("--num", type=int, default=32)
  p.add_argument("--scales", default="0,30,100,300,1000")
  p.add_argument("--clip_steps", type=int, default=600)
  p.add_argument("--cutouts", type=int, default=0)
  args = p.parse_args()
  scales = [float(s) for s in args.scales.split(",")]

  tmp = tempfile.mkdtemp(prefix="bench_clip_")
  t0 = time.time()
  guide_clip = train_clip(os.path.join(tmp, "guide"), 0, args.clip_steps)
  score_clip = train_clip(os.path.join(tmp, "score"), 1, args.clip_steps)
  clip_train_s = time.time() - t0
  evaluator = ShapesAlignmentEvaluator(num_prompts=4 * args.num, two_object_fraction=0.0, seed=123)
  prompts = evaluator.prompts[: args.num]
  evaluator = ShapesAlignmentEvaluator(prompts=prompts)
  # Sanity check of the scorer: renders vs shuffled captions.
  renders = np.stack(
    [
      ds.render(ds.scene_from_spec(ds.parse_caption(q), np.random.default_rng(i)), 64)
      for i, q in enumerate(prompts)
    ]
  )
  shuffled = list(np.random.default_rng(0).permutation(prompts))
  scorer_check = (
    clip_score(score_clip, renders, prompts),
    clip_score(score_clip, renders, shuffled),
  )
  print(
    f"scoring CLIP on renders: own captions {scorer_check[0]:.2f}, shuffled {scorer_check[1]:.2f}"
  )

  cascade = Cascade.from_workdir(args.workdir, max_batch=16)
  final = cascade.stages[-1].name
  rows, results = [], []
  for s in scales:
    guide = ClipGuidance(guide_clip, s, cutouts=args.cutouts) if s > 0 else None
    cascade.generate(prompts, seed=0, guide=guide, progress=False)  # compile every bucket
    t = time.time()
    out, _ = cascade.generate(prompts, seed=0, guide=guide, progress=False)
    seconds = (time.time() - t) / len(prompts)
    images = out[final]
    m = evaluator.run(images)
    row = {
      "scale": s,
      "alignment": round(m["alignment"], 3),
      "clip_score": round(clip_score(score_clip, images, prompts), 2),
      "clip_score_guide": round(clip_score(guide_clip, images, prompts), 2),
      "mean_cos": round(float(pair_scores(score_clip, images, prompts).mean()) / 100, 4),
      "s_per_image": round(seconds, 3),
    }
    print(json.dumps(row))
    results.append(row)
    rows.append(images[:8])
  grid = metrics.captioned_grid(
    np.concatenate(rows), [f"s={s:g}: {q}" for s in scales for q in prompts[:8]], ncols=8
  )
  os.makedirs(DOCS, exist_ok=True)
  Image.fromarray(grid).save(os.path.join(DOCS, "clip_guidance.png"))
  record(
    {
      "bench": "clip_guidance",
      "workdir": args.workdir,
      "num_prompts": len(prompts),
      "clip_steps": args.clip_steps,
      "clip_train_s": round(clip_train_s, 1),
      "cutouts": args.cutouts,
      "scorer_renders_own_vs_shuffled": [round(v, 2) for v in scorer_check],
      "rows": results,
    }
  )
  print(json.dumps(machine_info()))


if __name__ == "__main__":
  main()
