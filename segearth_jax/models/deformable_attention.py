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
  # One flat [B*H*S, Dh] table: every sample is a plain 1-D gather (its gradient a plain scatter-add).
  # Levels and the 4 bilinear corners are vectorised (per-level sizes as constants): one gather, one
  # weighted sum, few ops to compile.
  table = value.transpose(0, 2, 1, 3).reshape(b * h * s, dh)
  sizes = np.array([[ww, hh] for hh, ww in spatial_shapes], np.float32)         # [L, 2] as (w, h)
  starts = np.cumsum([0] + [hh * ww for hh, ww in spatial_shapes[:-1]]).astype(np.int32)
  loc = sampling_locations.astype(jnp.float32).transpose(0, 2, 1, 3, 4, 5)       # [B,H,Q,L,P,2]
  # align_corners=False: pixel centres sit at (i + 0.5) / size.
  pix = loc * sizes[:, None, :] - 0.5
  lo = jnp.floor(pix)
  frac = pix - lo
  corner = np.array([[0, 0], [1, 0], [0, 1], [1, 1]], np.float32)                # (dx, dy) per corner
  xy = lo[..., None, :] + corner                                                  # [B,H,Q,L,P,4,2]
  wxy = jnp.where(corner > 0, frac[..., None, :], 1.0 - frac[..., None, :])
  limit = (sizes - 1)[:, None, None, :]                                          # [L,1,1,2]
  inside = jnp.all((xy >= 0) & (xy <= limit), axis=-1)
  xy = jnp.clip(xy, 0, limit).astype(jnp.int32)
  width = sizes[:, 0].astype(np.int32)[:, None, None]
  flat = starts[:, None, None] + xy[..., 1] * width + xy[..., 0]                 # [B,H,Q,L,P,4]
  flat = flat + (jnp.arange(b * h, dtype=jnp.int32) * s).reshape(b, h, 1, 1, 1, 1)
  attn = attention_weights.astype(jnp.float32).transpose(0, 2, 1, 3, 4)          # [B,H,Q,L,P]
  wts = jnp.where(inside, wxy[..., 0] * wxy[..., 1], 0.0) * attn[..., None]
  k = n_levels * n_points * 4
  picked = jnp.take(table, flat.reshape(-1), axis=0, mode="clip").reshape(b, h, q, k, dh)
  out = jnp.einsum("bhqk,bhqkd->bhqd", wts.reshape(b, h, q, k).astype(value.dtype), picked,
                   preferred_element_type=jnp.float32)
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
