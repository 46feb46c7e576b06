"""Train an Imagen cascade (any stages, CPU to TPU pod).

  python train.py                                   # the shapes demo (configs/shapes.py)
  python train.py --config=shapes:ci                # a built-in config by name (or a path)
  python train.py --config=configs/base64.py        # the paper's 2B base model
  python train.py --config=configs/sr256.py:tiny --workdir=runs/sr256_tiny
  python train.py --config.stages.base.total_steps=100 --config.text.encoder=/path/to/t5-v1_1-xxl
  python train.py --config=configs/base64.py --config.mesh.data=1 --config.mesh.fsdp=-1  # FSDP
  python train.py --multihost ...                   # every host of a TPU pod / SLURM job
  python train.py --debug ...                       # full tracebacks (or IMAGEN_JAX_DEBUG=1)

Installed, the same command is `imagen-jax-train`. Every run resumes from the latest checkpoint in
--workdir. The flags and the code are in imagen_jax/tools/train.py. See README.md.
"""

from imagen_jax.tools.train import run

if __name__ == "__main__":
  run()
