"""`python -m bench`: ldm_core against diffusers / transformers on the same random SD1.5 weights.

UNet forward, VAE decode, text encode and cold checkpoint loading, timed interleaved
on CPU in fp32, with the outputs of each pair compared. See `__main__.py` for options.
"""
import os

# Offline before anything imports huggingface_hub (it reads these once, at import):
# every reference is built from local configs, and nothing may be fetched.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
