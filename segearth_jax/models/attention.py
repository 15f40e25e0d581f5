"""Causal self-attention kernels with a 'plain' / 'fused' switch, rotary embedding, and the [SEG]-row
attention that the spatial supervision loss (L_S) reads.

Shapes: q [B, Lq, H, Dh], k/v [B, Lk, Hkv, Dh] (H a multiple of Hkv, grouped as in transformers'
repeat_kv: head h reads kv head h // (H // Hkv)), mask bool [B, Lq, Lk] (True = may attend).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# The value jax.nn.dot_product_attention's XLA path writes into masked logits; using the same one makes
# fully masked (padding) query rows identical in both paths.
_NEG = float(-0.7 * np.finfo(np.float32).max)


def rotary_inv_freq(rotary_dim: int, theta: float) -> np.ndarray:
  # transformers computes this in float32 on the host; do the same so both agree bit for bit.
  exps = np.arange(0, rotary_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(rotary_dim)
  return (np.float32(1.0) / (np.float32(theta) ** exps)).astype(np.float32)


def apply_rotary(x, positions, rotary_dim: int, theta: float):
  """Partial rotary embedding (rotate-half convention) on the first ``rotary_dim`` dims of x [B,L,H,Dh]."""
  if rotary_dim == 0:
    return x
  inv = jnp.asarray(rotary_inv_freq(rotary_dim, theta))
  freqs = positions.astype(jnp.float32)[..., None] * inv           # [B, L, rot/2]
  emb = jnp.concatenate([freqs, freqs], -1)[:, :, None, :]           # [B, L, 1, rot]
  cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
  xr, xp = x[..., :rotary_dim], x[..., rotary_dim:]
  half = rotary_dim // 2
  rot = jnp.concatenate([-xr[..., half:], xr[..., :half]], -1)
  return jnp.concatenate([xr * cos + rot * sin, xp], -1)


def causal_mask(query_slots, key_valid):
  """query_slots [B, Lq] (absolute slot of each query), key_valid [B, Lk] -> bool [B, Lq, Lk]."""
  key_slots = jnp.arange(key_valid.shape[1])
  return (key_slots[None, None, :] <= query_slots[:, :, None]) & key_valid[:, None, :].astype(bool)


def _group(q, n_kv):
  b, l, h, d = q.shape
  return q.reshape(b, l, n_kv, h // n_kv, d)


def attention_probs(q, k, mask, scale):
  """Post-softmax probabilities [B, H, Lq, Lk] (float32)."""
  b, lq, h, _ = q.shape
  logits = jnp.einsum("bqkgd,bskd->bkgqs", _group(q, k.shape[2]), k) * scale
  logits = jnp.where(mask[:, None, None], logits.astype(jnp.float32), _NEG)
  return jax.nn.softmax(logits, axis=-1).reshape(b, h, lq, k.shape[1])


def plain_attention(q, k, v, mask, scale):
  """Softmax attention; returns (out [B, Lq, H, Dh], probs [B, H, Lq, Lk])."""
  b, lq, h, d = q.shape
  probs = attention_probs(q, k, mask, scale)
  p = probs.reshape(b, k.shape[2], h // k.shape[2], lq, k.shape[1]).astype(v.dtype)
  out = jnp.einsum("bkgqs,bskd->bqkgd", p, v).reshape(b, lq, h, d)
  return out, probs


def fused_attention(q, k, v, mask, scale):
  """jax.nn.dot_product_attention (cuDNN flash where the backend has it, XLA otherwise)."""
  return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=scale)


def _image_columns(rows, image_start, n_image_tokens):
  """rows [B, K, Lk] -> [B, K, n_image_tokens] at columns image_start[b] + j."""
  cols = image_start[:, None].astype(jnp.int32) + jnp.arange(n_image_tokens, dtype=jnp.int32)[None]
  cols = jnp.broadcast_to(cols[:, None, :], rows.shape[:2] + (n_image_tokens,))
  return jnp.take_along_axis(rows, cols, axis=2)


def seg_rows_from_probs(probs, seg_positions, image_start, n_image_tokens):
  """Plain path: pick [SEG] rows out of full probs [B, H, Lq, Lk]; heads summed -> [B, K, n_img]."""
  idx = jnp.broadcast_to(seg_positions[:, None, :, None].astype(jnp.int32),
                         probs.shape[:2] + (seg_positions.shape[1], probs.shape[3]))
  rows = jnp.take_along_axis(probs, idx, axis=2).sum(1)              # [B, K, Lk]
  return _image_columns(rows, image_start, n_image_tokens)


def seg_rows_recomputed(q, k, mask, scale, seg_positions, image_start, n_image_tokens):
  """Fused path: recompute only the K [SEG] query rows from Q and K; never forms [B, H, L, L]."""
  pos = seg_positions.astype(jnp.int32)
  q_rows = jnp.take_along_axis(q, pos[:, :, None, None], axis=1)     # [B, K, H, Dh]
  m_rows = jnp.take_along_axis(mask, pos[:, :, None], axis=1)        # [B, K, Lk]
  probs = attention_probs(q_rows, k, m_rows, scale)                  # [B, H, K, Lk]
  return _image_columns(probs.sum(1), image_start, n_image_tokens)
