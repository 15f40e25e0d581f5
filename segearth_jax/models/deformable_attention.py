"""Multi-scale deformable attention (Deformable DETR, as Mask2Former's pixel decoder uses it), pure JAX.

Each query samples ``P`` points per head on every level of a multi-level feature map (bilinear, zero
outside the map, the ``grid_sample(align_corners=False)`` convention) and returns their
attention-weighted sum. Shapes are static: the levels' (h, w) are a Python tuple.

Kernel seam: ``ms_deform_attn_core(..., impl=name)`` dispatches through ``IMPLS``; a faster backend
(e.g. a Pallas kernel) registers itself with ``register_impl`` and callers pick it by name
(``MultiscaleDeformableAttention.impl``, ``PixelDecoderConfig.deform_attn_impl``).
"""
from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from segearth_jax.models.layers import dense

SpatialShapes = Sequence[tuple[int, int]]
CoreFn = Callable[[jax.Array, SpatialShapes, jax.Array, jax.Array], jax.Array]

IMPLS: dict[str, CoreFn] = {}


def register_impl(name: str, fn: CoreFn) -> None:
  """Makes ``fn(value, spatial_shapes, sampling_locations, attention_weights)`` selectable as ``impl=name``."""
  IMPLS[name] = fn


def ms_deform_attn_core(value: jax.Array, spatial_shapes: SpatialShapes, sampling_locations: jax.Array,
                        attention_weights: jax.Array, impl: str = "xla") -> jax.Array:
  """value [B,S,H,Dh] (levels concatenated, each flattened row-major h*w); spatial_shapes ((h, w), ...);
  sampling_locations [B,Q,H,L,P,2] as (x, y) in [0, 1] (outside allowed: zero padding);
  attention_weights [B,Q,H,L,P]. Returns [B,Q,H*Dh]."""
  try:
    fn = IMPLS[impl]
  except KeyError:
    raise ValueError(f"deformable attention impl {impl!r} is not registered; known: {sorted(IMPLS)}") from None
  return fn(value, tuple(tuple(int(d) for d in s) for s in spatial_shapes), sampling_locations, attention_weights)


def _core_xla(value, spatial_shapes, sampling_locations, attention_weights):
  b, s, h, dh = value.shape
  _, q, _, n_levels, n_points, _ = sampling_locations.shape
  if s != sum(hh * ww for hh, ww in spatial_shapes):
    raise ValueError(f"value has {s} tokens but spatial_shapes {spatial_shapes} sum to a different count")
  if n_levels != len(spatial_shapes):
    raise ValueError(f"sampling_locations has {n_levels} levels but spatial_shapes has {len(spatial_shapes)}")
  # One [B, H, S, Dh] table gathered along S with B and H as batch dims of the gather (its gradient a
  # batched scatter-add), so the SPMD partitioner keeps the batch sharded: a table flattened over B*H*S
  # couples the rows of every sample and is replicated over the global batch (2.6 GiB per v5e chip).
  # Indices and weights are laid out [L*4, B, H, Q*P] (chunk = level x bilinear corner, Q*P minor: TPU
  # tiles pad small minor dims such as P or the corner axis up to 128), and the samples are gathered and
  # summed one chunk at a time under jax.checkpoint, so neither pass holds all L*P*4 samples of every
  # query (two 3.9 GiB f32 buffers per v5e chip at the paper's 1024 canvas).
  table = value.transpose(0, 2, 1, 3)
  n = q * n_points

  def per_level(x):   # [B,Q,H,L,P] -> [L,B,H,Q*P]
    return x.transpose(3, 0, 2, 1, 4).reshape(n_levels, b, h, n)

  def level_const(values, dtype):   # per-level sizes as constants, broadcast over [L,B,H,Q*P]
    return np.asarray(values, dtype).reshape(n_levels, 1, 1, 1)

  width = level_const([ww for _, ww in spatial_shapes], np.int32)
  height = level_const([hh for hh, _ in spatial_shapes], np.int32)
  starts = level_const(np.cumsum([0] + [hh * ww for hh, ww in spatial_shapes[:-1]]), np.int32)
  loc = sampling_locations.astype(jnp.float32)
  # align_corners=False: pixel centres sit at (i + 0.5) / size.
  px = per_level(loc[..., 0]) * width.astype(np.float32) - 0.5
  py = per_level(loc[..., 1]) * height.astype(np.float32) - 0.5
  x0, y0 = jnp.floor(px), jnp.floor(py)
  fx, fy = px - x0, py - y0
  attn = per_level(attention_weights.astype(jnp.float32))
  index, weight = [], []
  for dx, dy in ((0, 0), (1, 0), (0, 1), (1, 1)):   # the bilinear corners
    x, y = (x0 + dx).astype(jnp.int32), (y0 + dy).astype(jnp.int32)
    inside = (x >= 0) & (x < width) & (y >= 0) & (y < height)
    index.append(starts + jnp.clip(y, 0, height - 1) * width + jnp.clip(x, 0, width - 1))
    w = (fx if dx else 1.0 - fx) * (fy if dy else 1.0 - fy)
    weight.append(jnp.where(inside, w, 0.0) * attn)
  index = jnp.stack(index, 1).reshape(n_levels * 4, b, h, n)
  weight = jnp.stack(weight, 1).reshape(n_levels * 4, b, h, n)

  @jax.checkpoint
  def add_chunk(acc, chunk):
    idx, w = chunk
    picked = jnp.take_along_axis(table, idx[..., None], axis=2, mode="clip")   # [B,H,Q*P,Dh]
    part = (picked.astype(jnp.float32) * w[..., None]).reshape(b, h, q, n_points, dh).sum(3)
    return acc + part, None

  out, _ = jax.lax.scan(add_chunk, jnp.zeros((b, h, q, dh), jnp.float32), (index, weight))
  return out.transpose(0, 2, 1, 3).reshape(b, q, h * dh).astype(value.dtype)


register_impl("xla", _core_xla)


class MultiscaleDeformableAttention(nn.Module):
  """Deformable attention of ``hidden_states`` (+ position embeddings) over ``encoder_hidden_states``.

  Params (HF names): sampling_offsets [C -> H*L*P*2], attention_weights [C -> H*L*P], value_proj,
  output_proj. Offsets are in pixels of each level, normalised by that level's (w, h).
  """
  embed_dim: int
  num_heads: int
  spatial_shapes: tuple[tuple[int, int], ...]
  num_points: int = 4
  impl: str = "xla"
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, hidden_states, encoder_hidden_states, reference_points, position_embeddings=None):
    """hidden_states [B,Q,C], encoder_hidden_states [B,S,C], reference_points [B|1,Q,L,2] as (x, y) in
    [0, 1], position_embeddings [B|1,Q,C] or None. Returns [B,Q,C]."""
    n_heads, n_levels, n_points = self.num_heads, len(self.spatial_shapes), self.num_points
    if self.embed_dim % n_heads:
      raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {n_heads}")
    if reference_points.shape[-1] != 2:
      raise ValueError(f"reference_points must end in (x, y); got shape {reference_points.shape}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    query = hidden_states if position_embeddings is None else hidden_states + position_embeddings
    b, q, _ = query.shape
    s = encoder_hidden_states.shape[1]
    value = dense(self.embed_dim, ("head_embed", "head_heads"), name="value_proj", **kw)(encoder_hidden_states)
    value = value.reshape(b, s, n_heads, self.embed_dim // n_heads)
    # Locations need float32: a bf16 offset is off by a pixel on the large levels.
    offsets = dense(n_heads * n_levels * n_points * 2, ("head_embed", "head_heads"), name="sampling_offsets",
                    dtype=jnp.float32, param_dtype=self.param_dtype)(query.astype(jnp.float32))
    offsets = offsets.reshape(b, q, n_heads, n_levels, n_points, 2)
    logits = dense(n_heads * n_levels * n_points, ("head_embed", "head_heads"), name="attention_weights",
                   dtype=jnp.float32, param_dtype=self.param_dtype)(query.astype(jnp.float32))
    weights = jax.nn.softmax(logits.reshape(b, q, n_heads, n_levels * n_points), axis=-1)
    weights = weights.reshape(b, q, n_heads, n_levels, n_points)
    normalizer = np.array([[w, h] for h, w in self.spatial_shapes], np.float32)   # (x, y) per level
    locations = (reference_points.astype(jnp.float32)[:, :, None, :, None, :]
                 + offsets / normalizer[None, None, None, :, None, :])
    out = ms_deform_attn_core(value, self.spatial_shapes, locations, weights, impl=self.impl)
    return dense(self.embed_dim, ("head_heads", "head_embed"), name="output_proj", **kw)(out.astype(self.dtype))
