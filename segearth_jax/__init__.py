"""SegEarth-R2 in JAX/Flax: free-form language about a remote-sensing image -> pixel masks.

Importing the package keeps a new user's console readable (both only when the user has not chosen):
- libtpu installed on a host without a TPU (the test extra installs it for the AOT compile): jax would
  probe the TPU backend and print libtpu's initialisation trace on every command; the TPU platform is left
  out instead (``JAX_PLATFORMS``; the AOT compile describes its slice without it).
- transformers without PyTorch advises on every import that its models are unavailable; we only use its
  tokenizers there.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import sys

__version__ = "0.1.0"


def _platforms_without_tpu() -> str | None:
  """The JAX_PLATFORMS that skips a TPU probe bound to fail, or None when nothing needs to change."""
  if os.environ.get("JAX_PLATFORMS") or importlib.util.find_spec("libtpu") is None:
    return None
  if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):   # TPU VM chips
    return None
  gpu = [p for p in ("cuda", "rocm") if any(importlib.util.find_spec(f"jax_{p}{v}_plugin") for v in (12, 13, 7))]
  return ",".join(gpu + ["cpu"])


_platforms = _platforms_without_tpu()
if _platforms:
  if "jax" in sys.modules:   # jax read the environment at import: tell its config directly
    sys.modules["jax"].config.update("jax_platforms", _platforms)
  else:
    os.environ["JAX_PLATFORMS"] = _platforms
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
