"""Small configs and batches for the training tests (shared by several test files)."""
from __future__ import annotations

import os

import numpy as np

from segearth_jax.config import load_config
from segearth_jax.data.batch import dummy_batch
from segearth_jax.presets import image_grid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A model small enough that one train-step compile takes seconds on a 2-core CPU.
TINY_OVERRIDES = [
    "--config.model.vision.image_size=56", "--config.model.vision.num_hidden_layers=2",
    "--config.model.swin.image_size=64", "--config.model.swin.depths=(1,1,1,1)",
    "--config.model.pixel_decoder.encoder_layers=1", "--config.model.mask_decoder.num_layers=2",
    "--config.model.max_seg=2", "--config.loss.num_points=256",
    "--config.data.text_buckets=(128,)", "--config.data.max_len=128",
    "--config.train.batch_size=8", "--config.train.steps=6", "--config.train.warmup_ratio=0.0",
    "--config.train.log_every=1",
]


def tiny_config(*extra: str):
  return load_config(os.path.join(REPO, "experiments", "toy.py"), TINY_OVERRIDES + list(extra))


def random_batch(config, batch_size: int, seed: int = 0) -> dict:
  """A batch with the pipeline's contract filled with random but valid content."""
  rng = np.random.default_rng(seed)
  b = dummy_batch(config, batch_size, min(config.data.text_buckets))
  m = config.model
  B, L = b["input_ids"].shape
  G = image_grid(m)
  n_img = G * G
  vocab = m.llm.vocab_size
  b["siglip_image"] = rng.normal(size=b["siglip_image"].shape).astype(np.float32)
  b["swin_image"] = rng.normal(size=b["swin_image"].shape).astype(np.float32)
  b["input_ids"] = rng.integers(3, vocab - 1, size=(B, L)).astype(np.int32)
  b["image_start"][:] = 2
  lengths = rng.integers(n_img + 20, L, size=B)
  b["attention_mask"] = (np.arange(L)[None] < lengths[:, None]).astype(np.int32)
  K = m.max_seg
  for i in range(B):
    n_seg = i % (K + 1)
    pos = np.sort(rng.choice(np.arange(n_img + 5, lengths[i]), size=n_seg, replace=False))
    b["seg_positions"][i] = 0
    b["seg_positions"][i, :n_seg] = pos
    b["seg_valid"][i] = np.arange(K) < n_seg
    b["labels"][i] = np.where((np.arange(L) >= n_img + 5) & (np.arange(L) < lengths[i]), b["input_ids"][i], -100)
    for k in range(n_seg):
      M = m.swin.image_size
      y0, x0 = rng.integers(0, M // 2, size=2)
      b["masks"][i, k, y0:y0 + M // 3, x0:x0 + M // 4] = 1
      g = b["masks"][i, k].reshape(G, M // G, G, M // G).max(axis=(1, 3)) if M % G == 0 else \
          (rng.random((G, G)) > 0.7)
      b["mask_grid"][i, k] = g.astype(np.float32)
  return b
