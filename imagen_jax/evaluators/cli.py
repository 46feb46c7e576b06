"""``python -m imagen_jax.evaluators``: score a folder of generated images, or make FID statistics.

Score what ``sample.py`` wrote (PNGs + ``metadata.json``, or ``NAME.png`` + ``NAME.txt``)::

    python -m imagen_jax.evaluators --images_dir=samples/ --evals=clip_score,fid \\
        --clip=/ckpt/clip-vit-large-patch14 \\
        --inception=/ckpt/pt_inception-2015-12-05-6726825d.pth --ref_stats=coco_val.npz

Reference statistics of real images for FID and KID (``--no-ref_features``: FID only), once::

    python -m imagen_jax.evaluators --ref_stats_from=/data/coco_val2014/ --out=coco_val.npz \\
        --inception=/ckpt/pt_inception-2015-12-05-6726825d.pth

Results print as a table (``--json`` also prints JSON; ``--out`` writes them to a file). A mistake
is one ``error:`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from collections.abc import Sequence

from PIL import Image

from imagen_jax import config as config_lib
from imagen_jax.evaluators import fid as fid_lib
from imagen_jax.evaluators import registry
from imagen_jax.evaluators.images import as_float_images, load_images_dir


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog="python -m imagen_jax.evaluators", description=__doc__.split("\n")[0]
  )
  what = p.add_mutually_exclusive_group(required=True)
  what.add_argument("--images_dir", help="generated PNGs with their prompts (sample.py's output)")
  what.add_argument(
    "--ref_stats_from", help="a folder of real images: write FID statistics (--out)"
  )
  p.add_argument(
    "--evals", default="clip_score", help=f"comma-separated, of {registry.EVALUATOR_NAMES}"
  )
  p.add_argument("--clip", default="", help="CLIP checkpoint dir or hub id (clip_score)")
  p.add_argument(
    "--inception", default="", help="pytorch-fid Inception weights (.pth/.safetensors)"
  )
  p.add_argument("--ref_stats", default="", help="reference statistics .npz (fid)")
  p.add_argument(
    "--ref_features",
    action=argparse.BooleanOptionalAction,
    default=True,
    help="store the features too (KID needs them; 8 KiB per image)",
  )
  p.add_argument("--batch_size", type=int, default=32, help="images per forward pass")
  p.add_argument(
    "--out", default="", help="results JSON (scoring) or statistics .npz (--ref_stats_from)"
  )
  p.add_argument("--json", action="store_true", help="also print the results as JSON")
  return p


def _evals_config(args: argparse.Namespace, prompts: Sequence[str]):
  evals = config_lib.run_config().evals
  evals.evaluators = tuple(registry.parse_names(args.evals, "--evals"))
  evals.prompts = tuple(prompts)  # shapes scores the folder's own prompts
  evals.clip_score.update(clip=args.clip, batch_size=args.batch_size)
  evals.fid.update(inception=args.inception, ref_stats=args.ref_stats, batch_size=args.batch_size)
  return evals


_FLAG_OF = {
  "clip_score.clip": "--clip",
  "fid.inception": "--inception",
  "fid.ref_stats": "--ref_stats",
}


def _as_flags(message: str) -> str:
  """Config field names in ``check_evals``' messages → this tool's flags."""
  for field, flag in _FLAG_OF.items():
    message = message.replace(f"config.evals.{field}", flag)
  return message.replace("config.evals.evaluators", "--evals")


def score_dir(args: argparse.Namespace) -> dict[str, float]:
  """Runs ``--evals`` on ``--images_dir``; pictures (the grid) go to ``images_dir/eval/``."""
  prompts, images = load_images_dir(args.images_dir)
  evals = _evals_config(args, prompts)
  registry.check_evals(evals)
  evaluators = registry.build_evaluators(evals)
  scalars, pictures = registry.run_evaluators(evaluators, as_float_images(images), prompts)
  for name, picture in pictures.items():  # in a subfolder: the folder stays scorable
    path = pathlib.Path(args.images_dir) / "eval" / f"{name}.png"
    path.parent.mkdir(exist_ok=True)
    Image.fromarray(picture).save(path)
    print(f"wrote {path}")
  return scalars


def main(argv: Sequence[str] | None = None) -> int:
  parser = _parser()
  args = parser.parse_args(argv)
  if args.batch_size < 1:
    parser.error(f"--batch_size must be >= 1, got {args.batch_size}")
  try:
    if args.ref_stats_from:
      if not args.inception or not args.out:
        parser.error("--ref_stats_from needs --inception (the weights) and --out (the .npz)")
      stats = fid_lib.reference_stats(
        args.ref_stats_from,
        args.inception,
        args.out,
        batch_size=args.batch_size,
        keep_features=args.ref_features,
      )
      print(f"wrote {args.out}: {stats.count} images")
      return 0
    results = score_dir(args)
  except (ValueError, FileNotFoundError) as e:
    parser.error(_as_flags(str(e)))
  print(f"== {args.images_dir} ==")
  print(registry.format_results(results))
  if args.json:
    print(json.dumps(results, indent=2))
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
