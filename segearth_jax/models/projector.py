"""Vision -> LLM projector (LLaVA `mlp2x_gelu`) and the LLaVA-style splice of image tokens."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from segearth_jax.models.layers import activation, dense, dtype_of


class Projector(nn.Module):
  """Linear(in -> out) -> GELU -> Linear(out -> out).

  `hidden_act='gelu'` is the exact (erf) GELU of torch `nn.GELU()`, which LLaVA's `mlp2x_gelu` uses.
  Checkpoint names `mm_projector.0` / `.2` map to `fc1` / `fc2` (convert/siglip_map.projector_rules).
  """
  hidden_size: int    # input width (the vision tower's hidden_size)
  out_features: int   # LLM width: the output of both layers
  hidden_act: str = "gelu"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    if x.shape[-1] != self.hidden_size:
      raise ValueError(f"projector: input width {x.shape[-1]} != hidden_size {self.hidden_size}")
    kw = dict(dtype=dtype_of(self.dtype), param_dtype=dtype_of(self.param_dtype))
    h = dense(self.out_features, ("embed", "mlp"), name="fc1", **kw)(x)
    h = activation(self.hidden_act)(h)
    return dense(self.out_features, ("mlp", "embed"), name="fc2", **kw)(h)


def splice_image_tokens(token_embeds, image_embeds, image_start):
  """Rows image_start[b] .. image_start[b]+N-1 of token_embeds[b] become image_embeds[b].

  token_embeds [B,L,D], image_embeds [B,N,D], image_start [B] int. The input pipeline has already
  expanded the `<image>` placeholder into N image-token ids, so every shape is static; a gather plus a
  select keeps it jit-friendly and differentiable w.r.t. both embeddings.
  """
  b, length, _ = token_embeds.shape
  n = image_embeds.shape[1]
  rel = jnp.arange(length)[None, :] - jnp.asarray(image_start, jnp.int32)[:, None]  # [B,L]
  inside = (rel >= 0) & (rel < n)
  gathered = jnp.take_along_axis(image_embeds, jnp.clip(rel, 0, n - 1)[..., None], axis=1)
  return jnp.where(inside[..., None], gathered.astype(token_embeds.dtype), token_embeds)
