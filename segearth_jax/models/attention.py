"""Attention kernels behind the ``attention_impl`` switch, rotary embedding, and the [SEG]-row attention
that the spatial supervision loss (L_S) reads.

Shapes: q [B, Lq, H, Dh], k/v [B, Lk, Hkv, Dh] (H a multiple of Hkv, grouped as in transformers'
repeat_kv: head h reads kv head h // (H // Hkv)); a dense mask is bool [B, Lq, Lk] (True = may attend).

``attention_impl`` (ATTENTION_IMPLS):
  'plain'      einsum -> float32 softmax -> einsum under the dense mask; returns the probabilities, from
               which L_S picks the [SEG] rows (the reference every other kernel is tested against).
  'fused'      ``jax.nn.dot_product_attention`` in its mask-free form where one exists (Phi-2 without a
               cache: ``is_causal`` + per-row ``key_value_seq_lengths`` of the right-padded rows; SigLIP: no
               mask), on the kernel ``attention_backend`` picks; [SEG] rows recomputed from Q and K for the
               [SEG] queries only (``seg_rows_recomputed``), so [B, H, L, L] is never formed.
  'fused_xla'  the same calls on the XLA kernel everywhere: the baseline to measure cuDNN against on a GPU,
               and the way around a cuDNN kernel that fails on some GPU / cuDNN version.

``attention_backend`` (resolved at trace time from the local default backend) picks 'cudnn' only when all hold,
else 'xla' (jax's own checks: jax/_src/cudnn/fused_attention_stablehlo.py, check_layout and
check_is_flash_attention; jax 0.10):
  - the call is mask-free (a dense mask would reach cuDNN as an additive bias [B, 1, Lq, Lk], as large as
    the logits the kernel exists to avoid; the KV-cache path, whose query slots are not 0..L-1 and whose
    valid slots need not form a prefix, keeps the dense mask and so the XLA kernel);
  - the platform is CUDA (not ROCm, CPU or TPU) with compute capability >= 8.0 (cuDNN's flash attention
    needs Ampere or later);
  - the dtype is bfloat16 or float16 (float32 goes to XLA);
  - the head dim is a multiple of 8 and <= 256 on Hopper or later (compute capability >= 9.0), <= 128 before.
Not checked here, and failing at trace or compile time instead: cuDNN on compute capability 10.3 before
cuDNN 9.11, and a sequence or head-dim axis sharded across devices (our sharding rules shard neither).

Mask-free Phi-2 form (``AttentionMask.kv_lengths``): without a cache, query i of row b may attend to keys
j <= i with j < kv_lengths[b] (the row's attention_mask sum), exactly the dense ``causal_mask`` of slots
0..L-1 over a right-padded prefix. ``query_seq_lengths`` is left out on purpose: padded query positions
then see the row's valid prefix, as under the dense mask, so 'plain' and 'fused' agree at every position
(those outputs are never read). A row with no valid key (kv_lengths 0) attends uniformly to every key on
the XLA kernel, as under the dense mask; on cuDNN its length is raised to 1 to keep the kernel away from an
empty softmax (the row is padding either way).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np

ATTENTION_IMPLS = ("plain", "fused", "fused_xla")

# The value jax.nn.dot_product_attention's XLA path writes into masked logits; using the same one makes
# fully masked (padding) query rows identical in both paths.
_NEG = float(-0.7 * np.finfo(np.float32).max)
_CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


class AttentionMask(NamedTuple):
  """Who may attend to whom, in the forms the kernels take (a pytree; a form not built is None).

  dense       bool [B, Lq, Lk]: 'plain', and every kernel on the KV-cache path.
  kv_lengths  int32 [B]: the mask-free causal form of right-padded rows (module docstring); None where
              only the dense form is exact.
  seg         bool [B, K, Lk]: the mask's rows at the K [SEG] queries (seg_rows_recomputed); None without L_S.
  """
  dense: jax.Array | None = None
  kv_lengths: jax.Array | None = None
  seg: jax.Array | None = None


def local_platform() -> tuple[str, tuple[int, int] | None]:
  """(platform, compute capability) of the default backend: 'cuda' with e.g. (9, 0), or 'rocm' / 'cpu' /
  'tpu' with None."""
  platform = jax.default_backend()
  if platform != "gpu":
    return platform, None
  # the test jax's cuDNN checks use: ROCm also reports platform 'gpu'
  if "cuda" not in jax.extend.backend.get_backend().platform_version.lower():
    return "rocm", None
  major, minor = (int(x) for x in jax.devices()[0].compute_capability.split(".")[:2])
  return "cuda", (major, minor)


def attention_backend(dtype, head_dim: int, *, dense_mask: bool = False, platform: str | None = None,
                      compute_capability: tuple[int, int] | None = None) -> str:
  """'cudnn' or 'xla' for one jax.nn.dot_product_attention call (rules in the module docstring).
  ``platform`` None: the local default backend's (local_platform); pass both to decide for another."""
  if platform is None:
    platform, compute_capability = local_platform()
  if dense_mask or platform != "cuda" or compute_capability is None or compute_capability < (8, 0):
    return "xla"
  if jnp.dtype(dtype) not in _CUDNN_DTYPES:
    return "xla"
  max_head_dim = 256 if compute_capability >= (9, 0) else 128
  if head_dim % 8 or head_dim > max_head_dim:
    return "xla"
  return "cudnn"


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


def fused_attention(q, k, v, scale, *, attention_impl: str = "fused", mask=None, is_causal: bool = False,
                    kv_lengths=None):
  """jax.nn.dot_product_attention -> out [B, Lq, H, Dh]. Either a dense ``mask`` [B, Lq, Lk], or the
  mask-free form: ``is_causal`` and/or ``kv_lengths`` [B] (keys j < kv_lengths[b] valid). 'fused' runs on
  the kernel attention_backend picks, 'fused_xla' on XLA."""
  if attention_impl == "fused_xla":
    backend = "xla"
  elif attention_impl == "fused":
    backend = attention_backend(q.dtype, q.shape[-1], dense_mask=mask is not None)
  else:
    raise ValueError(f"fused_attention: attention_impl must be 'fused' or 'fused_xla', got {attention_impl!r}")
  if kv_lengths is not None:
    kv_lengths = kv_lengths.astype(jnp.int32)
    if backend == "cudnn":
      kv_lengths = jnp.maximum(kv_lengths, 1)
  return jax.nn.dot_product_attention(q, k, v, mask=None if mask is None else mask[:, None], scale=scale,
                                      is_causal=is_causal, key_value_seq_lengths=kv_lengths,
                                      implementation=backend)


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


def seg_rows_recomputed(q, k, seg_mask, scale, seg_positions, image_start, n_image_tokens):
  """Fused path: recompute only the K [SEG] query rows from Q and K; never forms [B, H, L, L].
  seg_mask [B, K, Lk]: the mask's rows at those queries (AttentionMask.seg)."""
  pos = seg_positions.astype(jnp.int32)
  q_rows = jnp.take_along_axis(q, pos[:, :, None, None], axis=1)     # [B, K, H, Dh]
  probs = attention_probs(q_rows, k, seg_mask, scale)                # [B, H, K, Lk]
  return _image_columns(probs.sum(1), image_start, n_image_tokens)
