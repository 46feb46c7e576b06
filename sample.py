"""Sample images from a trained cascade (every stage), write PNGs, a grid and metadata.json.

  python sample.py                                   # the latest `python train.py` demo run
  python sample.py --workdir=runs/shapes --prompt="a large blue square in the center" --num_images=4
  python sample.py --prompts_file=prompts.txt --set=sr.steps=50 --set=base.guidance=7
  python sample.py --start_stage=sr --init_image=low.png      # upscale-only
  python sample.py --start_stage=base --init_image=x.png --strength=0.6   # img2img
  python sample.py --workdir=runs/base64,runs/sr256,runs/sr1024 --prompt="a corgi"  # run/stage
  python sample.py --workdir=runs/base64 --mesh=data=2,fsdp=4   # weights FSDP-sharded
  python sample.py --multihost ...                   # every host of a TPU pod / SLURM job
  python sample.py --init_image=x.png --mask=m.png --prompt="..."   # inpainting (white = new)
  python sample.py --init_image=x.png --outpaint=left:16 --prompt="..."     # outpainting
  python sample.py --init_image=x.png --variations --prompt="its caption" --num_images=4
  python sample.py --interpolate=a.png,b.png --frames=8 --prompt="a's caption" --prompt="b's"
  python sample.py --init_image=x.png --prompt="its caption" --text_diff="target" --eta=0,0.5,1
  python sample.py --init_image=x.png --invert --prompt="its caption" [--edit_prompt="..."]

Installed, the same command is `imagen-jax-sample`. The flags and the code are in
imagen_jax/tools/sample.py. See README.md ("Sampling") for every option.
"""

from imagen_jax.tools.sample import run

if __name__ == "__main__":
  run()
