"""Numbers that several layers of the package agree on, kept at the bottom so that every module can
import them without importing the module that happens to use them most.

This module is the bottom of the package: it imports nothing from it."""

# Latents of the Stable Diffusion VAE are multiplied by this before the DiT sees them (the reference's
# constant); a run's config records the value it used as latent_scale.
LATENT_SCALE = 0.18215
