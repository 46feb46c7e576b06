r"""Pre-encodes a dataset's captions with T5 into an on-disk embedding cache (command line).

Training can then look text embeddings up by caption instead of holding the T5 in accelerator
memory (``--config.text.embedding_cache=DIR``). Usage::

  python -m imagen_jax.tools.encode_texts --encoder /ckpt/t5-v1_1-xxl \
      --captions captions.txt --output_dir /data/t5xxl_cache --compute_dtype bfloat16

Inputs (exactly one): ``--captions`` a text file (one caption per line) or a JSONL file
(``--caption_key``, default ``caption``; a list value contributes every caption);
``--image_folder``, ``--manifest`` or ``--tfds``: the data pipeline's sources
(``imagen_jax.data.sources``), whose captions are normalized exactly as the pipeline does.
The cache format is documented in :mod:`imagen_jax.data.text_cache`.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence

import jax.numpy as jnp

from imagen_jax.data import sources
from imagen_jax.data.text_cache import (
  STORAGE_DTYPES,
  encode_to_cache,
  read_caption_file,
  read_source_captions,
)
from imagen_jax.text import T5Encoder
from imagen_jax.tools import cli

log = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog="python -m imagen_jax.tools.encode_texts", description=__doc__.split("\n\n")[0]
  )
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--captions", help=".txt (one caption per line) or .jsonl caption file")
  src.add_argument("--image_folder", help="images with same-name .txt captions")
  src.add_argument("--manifest", help="JSONL/CSV/TSV manifest of images and captions")
  src.add_argument("--tfds", help="prepared tfds dataset name or builder directory")
  p.add_argument("--tfds_data_dir", default=None)
  p.add_argument("--split", default="train")
  p.add_argument("--caption_key", default="caption", help="caption field (JSONL/manifest/tfds)")
  p.add_argument("--encoder", required=True, help="T5 checkpoint directory or Hub id")
  p.add_argument("--tokenizer", default=None, help="tokenizer dir if not next to the weights")
  p.add_argument("--output_dir", required=True)
  p.add_argument("--max_length", type=int, default=128)
  p.add_argument("--batch_size", type=int, default=32)
  p.add_argument("--shard_size", type=int, default=1024)
  p.add_argument("--storage_dtype", choices=sorted(STORAGE_DTYPES), default="float16")
  p.add_argument("--compute_dtype", choices=["float32", "bfloat16"], default="float32")
  p.add_argument("--limit", type=int, default=None, help="only the first N captions")
  p.add_argument("--debug", action="store_true", help=cli.DEBUG_HELP)
  return p


def _read_input(args) -> tuple[list[str], int]:
  if args.captions:
    return read_caption_file(args.captions, args.caption_key)
  if args.image_folder:
    source = sources.ImageFolderSource(args.image_folder)
  elif args.manifest:
    source = sources.ManifestSource(args.manifest, caption_key=args.caption_key)
  else:
    source = sources.TfdsSource(
      args.tfds, args.split, args.tfds_data_dir, caption_key=args.caption_key
    )
  return read_source_captions(source)


def main(argv: Sequence[str] | None = None) -> dict[str, int]:
  """Runs the tool; returns the counts of :func:`encode_to_cache` (plus ``replaced_utf8``)."""
  args = _parser().parse_args(argv)
  for flag, path, is_dir in (
    ("--captions", args.captions, False),
    ("--image_folder", args.image_folder, True),
    ("--manifest", args.manifest, False),
  ):
    if path and not (os.path.isdir(path) if is_dir else os.path.isfile(path)):
      raise FileNotFoundError(f"{flag}={path}: no such {'directory' if is_dir else 'file'}")
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
  captions, replaced = _read_input(args)
  if replaced:
    log.warning("%d captions had invalid UTF-8; bytes were replaced by U+FFFD", replaced)
  captions = captions[: args.limit] if args.limit else captions
  encoder = T5Encoder.from_pretrained(
    args.encoder, dtype=getattr(jnp, args.compute_dtype), max_length=args.max_length,
    tokenizer_path=args.tokenizer,
  )  # fmt: skip
  stats = encode_to_cache(
    captions, encoder, args.output_dir, shard_size=args.shard_size, batch_size=args.batch_size,
    storage_dtype=args.storage_dtype, encoder_name=args.encoder,
  )  # fmt: skip
  stats["replaced_utf8"] = replaced
  log.info("text-embedding cache %s: %s", args.output_dir, stats)
  return stats


if __name__ == "__main__":
  cli.run_tool(main)
