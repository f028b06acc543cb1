"""Whole jobs built from the layers below: KSampler-style sampling, text-to-image, and the
diffusion process taken apart step by step."""
