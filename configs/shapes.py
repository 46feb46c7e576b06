"""The built-in demo: a tiny two-stage cascade (32² base, 32²→64² super-resolution) on `shapes`.

This is what `python train.py` runs with no flags: no download, 6–8 minutes on 2 CPU cores
with AVX-512 and about 16 without (README "The shapes demo" has its numbers). It trains on the
procedurally rendered `shapes` captions ("a small red circle at the top left"), with a small
frozen T5 text encoder written to `workdir/text_encoder/`, scores prompt alignment of EMA samples
with the pixel-based shapes evaluator, and at the end scores the whole cascade (SR on the base's
samples).

  python train.py                                       # = --config=configs/shapes.py
  python train.py --config=configs/shapes.py:long       # the longer recipe (bench/, ~30 min)
  python train.py --config=configs/shapes.py:ci         # a few steps of the older models, for tests
  python train.py --config.stages.base.total_steps=500  # any field can be overridden
  python sample.py                                      # sample from the latest run

Args (`--config=configs/shapes.py:ARG`): "" (default demo), "long", "ci".
"""

from __future__ import annotations

from imagen_jax.config import run_config, stage_config

_SCALE = {
  # arg: (base steps, sr steps, eval_every)
  "": (500, 200, 250),
  "long": (2100, 900, 700),
  "ci": (4, 4, 0),
}


def get_config(arg: str | None = None):
  arg = arg or ""
  if arg not in _SCALE:
    raise ValueError(f"configs/shapes.py: unknown arg {arg!r}; choose one of {sorted(_SCALE)}")
  base_steps, sr_steps, eval_every = _SCALE[arg]
  config = run_config()
  config.text.encoder = "shapes_demo"
  config.text.max_length = 16
  config.data.source = "shapes"
  config.data.shuffle = False  # items are already i.i.d. random scenes
  config.evals.evaluators = ("shapes", "grid")
  config.evals.num_prompts = 64

  common = dict(
    batch_size=32,
    objective="eps",
    ema_decay=0.999,
    ckpt_every=max(base_steps // 4, 2),
    keep_ckpts=2,
    log_every=min(50, base_steps),
    eval_every=eval_every,
    num_eval_samples=16,
    max_consecutive_nonfinite=10,
  )
  opt = dict(name="adam", lr=2e-3, warmup_steps=100, schedule="cosine", end_lr=2e-4, clip_norm=1.0)
  config.stages.base = stage_config(
    "base", "tiny_base", image_size=32, total_steps=base_steps, **common
  )
  config.stages.base.optimizer.update(opt)
  # Capacity at 16² and 8², where captions' semantics live; thin at 32² where FLOPs are dear.
  config.stages.base.model.update(
    model_channels=16,
    channel_mult=(1, 2, 4),
    num_res_blocks=(1, 1, 1),
    attn_resolutions=(16, 8),
    cross_attn_resolutions=(16, 8),
  )
  config.stages.sr = stage_config(
    "sr",
    "tiny_sr",
    image_size=64,
    lowres_size=32,
    total_steps=sr_steps,
    max_aug_level=0.5,
    **common,
  )
  # v-prediction for SR: with eps, x̂0 = (z − σε̂)/α amplifies errors at high noise, and after
  # 200 steps the SR samples were still noise (alignment 0.06); with v they reach 0.53.
  config.stages.sr.objective = "v"
  config.stages.sr.model.lowres_size = 32
  config.stages.sr.optimizer.update(opt)
  for s in (config.stages.base, config.stages.sr):
    s.sample.update(sampler="dpmpp_2m", steps=20, guidance=3.0, aug_level=0.1)
  config.stage_order = ("base", "sr")
  if arg == "long":
    _long_recipe(config)
  elif arg == "":
    _demo_recipe(config)
  else:  # ci: plumbing only; the whole-cascade eval would add two sampler compiles per run
    config.evals.cascade = False
  return config


def _demo_recipe(config) -> None:
  """What the default demo changes from the models above (kept by `:ci` and `:long`), and why.

  Measured by training the base 500 steps with one change at a time (bench/RESULTS.md "The default
  demo's recipe"; 128 eval prompts, 2-core AMD EPYC with AVX-512):

  - Query positions in the base's attention layers (`attention_positions=32`): the captions name a
    position, and cross-attention can only tie "left" or "top" to a region if its queries know
    where they are. Position accuracy 0.20 -> 0.46, single-object alignment 0.62 -> 0.73 (0.71
    with 16 features). The coordinate input channels (`coord_channels`) alone did not move it.
  - The base's output as a correction to the Gaussian posterior mean of x0 under
    N(0, `prior_var`) (`output_prior="gaussian"`, EDM's σ_data preconditioning): these images are
    mostly flat background, with a per-pixel variance of 0.026 in [-1, 1], far from the unit
    variance that ε- and v-prediction assume. 0.51 -> 0.62 (0.56 with prior_var 0.01).
  - The SR stage's output as a correction to the posterior mean given the upsampled 32² input
    (`output_prior="lowres"`): it starts as a denoising upsampler and learns only the detail.
    After 200 SR steps on the same base: 0.99 single-object alignment on rendered inputs (0.61
    without), and the cascade keeps what the base drew.
  - A 4× noisier schedule for the base (`schedule="shifted_cosine"`, `schedule_base_size=16`:
    λ − 1.39, "simple diffusion"'s shift): the layout is decided at high noise, and these images
    carry their layout in a few large flat regions, easy to read through noise. Position 0.65 ->
    0.84 on 128 held-out prompts (0.80 with 2× noisier); colour, size and shape unchanged.
  - Base self-attention at 8² only (text attention stays at 16² and 8²): self-attention at 16²
    cost 25% of the step on 2 CPU cores and did not help.
  - v-prediction, 15% two-object scenes and guidance 5 with 25 steps for the base, as in the
    long recipe (see `_long_recipe`).
  The final alignment is measured through the whole cascade (`config.evals.cascade`): the SR
  stage upsamples the base's own samples, as `sample.py` does.
  """
  config.data.shapes_two_object_prob = 0.15
  base = config.stages.base
  base.objective = "v"
  base.model.update(
    coord_channels=True,
    attn_resolutions=(8,),
    attention_positions=32,
    output_prior="gaussian",
    prior_var=0.03,
  )
  base.schedule, base.schedule_base_size = "shifted_cosine", 16  # 4× noisier at 32²
  base.sample.update(guidance=5.0, steps=25)
  config.stages.sr.model.output_prior = "lowres"


def _long_recipe(config) -> None:
  """The longer recipe (`bench/shapes_learning.py --arg=long`): what changes from the demo, and why.

  Measured (2-core AMD EPYC, shared): base EMA single-object alignment 0.92 on the 96 single-object
  eval prompts (0.90 on all 432 single-object captions; colour, size and cell all right, shape the
  bottleneck), SR 0.82 alignment on rendered 32² inputs. See README "The shapes demo".

  - v-prediction for the base too (it is what rescued the SR stage): with ε, x̂0 = (z − σε̂)/α is
    least accurate at the high-noise steps, where layout, colour and shape are decided.
  - Fewer two-object scenes in training (15%, from 30%): the target is single-object alignment.
  - Guidance 5 and 25 sampler steps for the base (Imagen samples at guidance ≥ 5).
  - 4.2× the base steps and 4.5× the SR steps (the cosine lr decay stretches with them).
  - 128 eval prompts (96 single-object, 32 two-object) for less noisy numbers; the SR stage is
    scored once, at the end.
  """
  config.data.shapes_two_object_prob = 0.15
  config.evals.num_prompts = 128
  config.stages.base.objective = "v"
  config.stages.base.sample.update(guidance=5.0, steps=25)
  config.stages.sr.eval_every = 0
