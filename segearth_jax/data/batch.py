"""The batch contract: what the input pipeline yields and the model steps take, in one place.

Batch (B = per-process batch = train.batch_size / process_count; static shapes):
  siglip_image f32[B,S,S,3]  swin_image f32[B,M,M,3]  input_ids/attention_mask/labels i32[B,L]
  image_start i32[B]  seg_positions i32[B,K]  seg_valid bool[B,K]  masks u8[B,K,M,M]
  mask_grid f32[B,K,G,G]  letterbox i32[B,4] (orig_h, orig_w, resized_h, resized_w)  sample_valid bool[B]
  example_id str[B] (host); eval adds prompt_len i32[B], answer str[B], subsets str[B] ('|'-joined),
  targets str[B] (JSON list of COCO RLE masks of every target at the image's own size, past the [SEG]
  cap too); train with data.mixture adds source str[B] ('builder/split' of each row; a string, so it
  stays on the host like HOST_ONLY's fields).
S = model.vision.image_size, G = presets.image_grid(model) (G*G image tokens), M = model.swin.image_size,
K = model.max_seg; L is the smallest of data.text_buckets that fits the batch's longest row. labels hold
IGNORE where no token is predicted (prompt, image tokens, padding).

  HOST_ONLY                            the string fields: they stay numpy on the host, never reach a device
  dummy_batch(config, B, length=None)  zeros with these shapes and dtypes (init, AOT compilation, benchmarks)
  device_part(batch)                   the numeric fields a step takes
  global_batch(host_batch, sharding_of)  per-process numpy -> global jax.Arrays; `sharding_of(ndim)` gives
                                       the batch-axis sharding (ModelSetup.batch_sharding)
"""
from __future__ import annotations

from typing import Callable

import jax
import numpy as np

from segearth_jax import presets

IGNORE = -100
HOST_ONLY = ("example_id", "answer", "subsets", "targets")


def dummy_batch(config, batch_size: int, length: int | None = None) -> dict:
  """Zeros with the input pipeline's (train) batch shapes; one [SEG] slot points just past the image."""
  m = config.model
  L = length or max(config.data.text_buckets)
  S, M, K = m.vision.image_size, m.swin.image_size, m.max_seg
  G = presets.image_grid(m)
  B = batch_size
  seg_pos = np.zeros((B, K), np.int32)
  seg_pos[:, 0] = min(L - 1, presets.image_tokens(m) + 2)
  return dict(
      siglip_image=np.zeros((B, S, S, 3), np.float32), swin_image=np.zeros((B, M, M, 3), np.float32),
      input_ids=np.zeros((B, L), np.int32), attention_mask=np.ones((B, L), np.int32),
      labels=np.full((B, L), IGNORE, np.int32), image_start=np.ones((B,), np.int32),
      seg_positions=seg_pos, seg_valid=np.zeros((B, K), bool),
      masks=np.zeros((B, K, M, M), np.uint8), mask_grid=np.zeros((B, K, G, G), np.float32),
      letterbox=np.full((B, 4), M, np.int32), sample_valid=np.ones((B,), bool))


def device_part(batch: dict) -> dict:
  """The fields a jitted step takes: every numeric field that is not host-only."""
  return {k: v for k, v in batch.items() if k not in HOST_ONLY and np.asarray(v).dtype.kind in "biuf"}


def global_batch(host_batch: dict, sharding_of: Callable[[int], jax.sharding.Sharding]) -> dict:
  """Per-process numpy batch -> global jax.Arrays laid out by `sharding_of(ndim)`; strings stay on the host."""
  out = {}
  for k, v in host_batch.items():
    v = np.asarray(v)
    if k in HOST_ONLY or v.dtype.kind in "USO":
      out[k] = v
    else:
      out[k] = jax.make_array_from_process_local_data(sharding_of(v.ndim), v)
  return out
