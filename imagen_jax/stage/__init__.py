"""One cascade stage: its U-Net, schedule, optimizer, text embedder and the jitted train step.

The layer between the core (``diffusion``, ``models``, ``text``, ``data``) and the programs built
on it (``sample``, ``train``): both the sampler and the trainer build a stage from its config here.
"""
