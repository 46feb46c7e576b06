"""Pixel-level evaluators that score generated images against their prompts."""
