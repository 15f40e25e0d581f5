"""Mask2Former masked-attention transformer decoder, driven by external [SEG] queries.

Semantics follow transformers' ``Mask2FormerTransformerModule`` + ``Mask2FormerMaskedAttentionDecoder``:
- 3 feature levels (``multi_scale_features`` in the order HF's decoder consumes them), each optionally
  projected by a 1x1 conv, plus a learned level embedding; keys get a normalised sine position embedding.
- Predictions (layernorm -> 3-layer ReLU MLP -> einsum with the stride-4 mask features) are made from the
  initial queries and after every layer; each prediction, bilinearly resized (align_corners=False) to the
  next layer's level, gives that layer's cross-attention mask (sigmoid < 0.5 -> masked; a fully masked row
  falls back to unmasked).
- Layer ``i`` reads level ``i % 3``: masked cross-attention -> self-attention -> FFN (post-norm by default).

SegEarth-R2 differences: no learned queries (the queries come from outside), zero query position, no class
head. Self-attention is masked to the diagonal (each query attends only to itself), which equals decoding
every [SEG] alone; padded slots (``query_valid`` False) never influence real ones and their logits are 0.

Layers are a Python loop, not ``nn.scan``: the round-robin over scales changes the cross-attention key
length per layer, and 9 small layers compile quickly. Params are ``layers_{i}/...``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from segearth_jax.models.layers import config_from_dict, dense, dtype_of, layer_norm, sine_position_embedding

NUM_LEVELS = 3
LN_EPS = 1e-5  # torch.nn.LayerNorm default, used by every norm of the HF decoder


@dataclasses.dataclass(frozen=True)
class MaskDecoderConfig:
  hidden_dim: int = 256
  num_layers: int = 9             # HF decoder_layers - 1
  num_attention_heads: int = 8
  dim_feedforward: int = 2048
  mask_embed_layers: int = 3
  pre_norm: bool = False
  # HF adds the 1x1 input projections when the pixel decoder width differs from hidden_dim or when forced.
  enforce_input_projection: bool = False

  @classmethod
  def from_dict(cls, cfg: Mapping[str, Any]) -> "MaskDecoderConfig":
    """From a presets ``mask_decoder`` ConfigDict (or plain dict; strict)."""
    return config_from_dict(cls, cfg, "model.mask_decoder")

  @classmethod
  def from_hf(cls, c) -> "MaskDecoderConfig":
    """From a transformers ``Mask2FormerConfig`` (HF's ``decoder_layers`` counts the initial prediction)."""
    return cls(hidden_dim=c.hidden_dim, num_layers=c.decoder_layers - 1,
               num_attention_heads=c.num_attention_heads, dim_feedforward=c.dim_feedforward,
               mask_embed_layers=3, pre_norm=c.pre_norm,
               enforce_input_projection=bool(c.enforce_input_projection))


def resize_bilinear(x: jnp.ndarray, size: tuple[int, int]) -> jnp.ndarray:
  """[..., H, W] -> [..., h, w]; torch interpolate(mode='bilinear', align_corners=False), no antialias."""
  if tuple(x.shape[-2:]) == tuple(size):
    return x
  return jax.image.resize(x, x.shape[:-2] + tuple(size), method="linear", antialias=False)


def _xavier():
  return nn.initializers.xavier_uniform()


class CrossAttention(nn.Module):
  """torch.nn.MultiheadAttention layout: packed in-projection [C, 3C] (q, k, v), out_proj."""
  dim: int
  heads: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, q_in, k_in, v_in, masked):
    # q_in [B,K,C]; k_in/v_in [B,N,C]; masked [B,K,N] bool (True = not attended)
    c, h = self.dim, self.heads
    w = self.param("in_proj_kernel", nn.with_logical_partitioning(_xavier(), ("head_embed", "head_heads")),
                   (c, 3 * c), self.param_dtype)
    b = self.param("in_proj_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("head_heads",)),
                   (3 * c,), self.param_dtype)
    w, b = w.astype(self.dtype), b.astype(self.dtype)
    q = q_in.astype(self.dtype) @ w[:, :c] + b[:c]
    k = k_in.astype(self.dtype) @ w[:, c:2 * c] + b[c:2 * c]
    v = v_in.astype(self.dtype) @ w[:, 2 * c:] + b[2 * c:]
    out = _attend(q, k, v, masked[:, None], h, self.dtype)
    return dense(c, ("head_heads", "head_embed"), dtype=self.dtype, param_dtype=self.param_dtype,
                 kernel_init=_xavier(), name="out_proj")(out)


def _attend(q, k, v, masked, heads, dtype):
  """Scaled dot-product attention; ``masked`` broadcasts to [B, heads, Q, N]."""
  bsz, nq, c = q.shape
  d = c // heads
  q = q.reshape(bsz, nq, heads, d) * (d ** -0.5)
  k = k.reshape(bsz, k.shape[1], heads, d)
  v = v.reshape(bsz, v.shape[1], heads, d)
  s = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
  s = jnp.where(masked, jnp.finfo(jnp.float32).min, s)
  p = jax.nn.softmax(s, axis=-1).astype(dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", p, v).reshape(bsz, nq, c)


class SelfAttention(nn.Module):
  """HF Mask2FormerAttention: separate q/k/v/out projections; position is added to q and k only."""
  dim: int
  heads: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, masked):
    def proj(name, ax):
      return dense(self.dim, ax, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=_xavier(),
                   name=name)
    # query position embedding is zero in SegEarth-R2, so q = k input = x
    q = proj("q_proj", ("head_embed", "head_heads"))(x)
    k = proj("k_proj", ("head_embed", "head_heads"))(x)
    v = proj("v_proj", ("head_embed", "head_heads"))(x)
    out = _attend(q, k, v, masked[:, None], self.heads, self.dtype)
    return proj("out_proj", ("head_heads", "head_embed"))(out)


class DecoderLayer(nn.Module):
  config: MaskDecoderConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, memory, memory_pos, cross_masked, self_masked):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    norm = lambda name: layer_norm(LN_EPS, name=name, **kw)
    cross = CrossAttention(cfg.hidden_dim, cfg.num_attention_heads, name="cross_attn", **kw)
    sattn = SelfAttention(cfg.hidden_dim, cfg.num_attention_heads, name="self_attn", **kw)
    fc1 = dense(cfg.dim_feedforward, ("head_embed", "head_mlp"), kernel_init=_xavier(), name="fc1", **kw)
    fc2 = dense(cfg.hidden_dim, ("head_mlp", "head_embed"), kernel_init=_xavier(), name="fc2", **kw)
    key = memory + memory_pos
    if cfg.pre_norm:
      y = norm("cross_attn_layer_norm")(x)
      x = x + cross(y, key, memory, cross_masked)
      x = x + sattn(norm("self_attn_layer_norm")(x), self_masked)
      x = x + fc2(nn.relu(fc1(norm("final_layer_norm")(x))))
    else:
      x = norm("cross_attn_layer_norm")(x + cross(x, key, memory, cross_masked))
      x = norm("self_attn_layer_norm")(x + sattn(x, self_masked))
      x = norm("final_layer_norm")(x + fc2(nn.relu(fc1(x))))
    return x


class MaskPredictor(nn.Module):
  """layernorm'd queries -> MLP (ReLU between) -> einsum with the mask features -> [B,K,H4,W4] logits."""
  hidden_dim: int
  out_dim: int
  num_layers: int = 3
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, q, mask_features):
    for j in range(self.num_layers):
      last = j == self.num_layers - 1
      # logical names must differ per dim; all head_* axes are replicated anyway
      q = dense(self.out_dim if last else self.hidden_dim, ("head_mlp", "head_embed"), dtype=self.dtype,
                param_dtype=self.param_dtype, name=f"mask_embedder_{j}")(q)
      if not last:
        q = nn.relu(q)
    return jnp.einsum("bqc,bhwc->bqhw", q, mask_features.astype(self.dtype))


class MaskDecoder(nn.Module):
  config: MaskDecoderConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, queries, query_valid, multi_scale_features: Sequence[jnp.ndarray], mask_features,
               *, self_attention: str = "diagonal"):
    """queries [B,K,C], query_valid [B,K] bool, 3 x [B,h,w,Cin], mask_features [B,H4,W4,Cm]
    -> mask logits [num_layers+1, B, K, H4, W4].

    ``self_attention='full'`` lets all valid queries attend to each other (HF's learned-query behaviour);
    used to check against transformers with several queries per image.
    """
    cfg = self.config
    dtype, pdt = dtype_of(self.dtype), dtype_of(self.param_dtype)
    kw = dict(dtype=dtype, param_dtype=pdt)
    c = cfg.hidden_dim
    if len(multi_scale_features) != NUM_LEVELS:
      raise ValueError(f"mask decoder: expected {NUM_LEVELS} feature levels, got {len(multi_scale_features)}")
    bsz, k = queries.shape[:2]

    level_embed = self.param("level_embed", nn.with_logical_partitioning(
        nn.initializers.normal(1.0), ("head_levels", "head_embed")), (NUM_LEVELS, c), pdt)
    memories, positions, sizes = [], [], []
    for lvl, f in enumerate(multi_scale_features):
      h, w, cin = f.shape[1:]
      if cin != c or cfg.enforce_input_projection:
        f = nn.Conv(c, (1, 1), dtype=dtype, param_dtype=pdt, name=f"input_proj_{lvl}",
                    kernel_init=nn.with_logical_partitioning(
                        _xavier(), (None, None, "patch", "head_embed")),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("head_embed",)))(f)
      memories.append(f.reshape(bsz, h * w, c).astype(dtype) + level_embed[lvl].astype(dtype))
      positions.append(jnp.asarray(sine_position_embedding(h, w, c // 2), dtype)[None])
      sizes.append((h, w))

    valid = query_valid.astype(bool)
    eye = jnp.eye(k, dtype=bool)
    if self_attention == "diagonal":
      self_masked = jnp.broadcast_to(~eye, (bsz, k, k))
    elif self_attention == "full":
      # padded keys are excluded; a padded row keeps itself so no row is empty
      self_masked = ~(valid[:, None, :] | eye[None])
    else:
      raise ValueError(f"self_attention must be 'diagonal' or 'full', got {self_attention!r}")

    norm = layer_norm(LN_EPS, name="layernorm", **kw)
    predictor = MaskPredictor(c, mask_features.shape[-1], cfg.mask_embed_layers, name="mask_predictor",
                              **kw)

    def predict(x, level):
      logits = predictor(norm(x), mask_features)
      small = resize_bilinear(logits.astype(jnp.float32), sizes[level])
      masked = jax.nn.sigmoid(small).reshape(bsz, k, -1) < 0.5
      masked = masked & ~jnp.all(masked, axis=-1, keepdims=True)   # fully masked row -> attend everywhere
      return logits, jax.lax.stop_gradient(masked)

    x = queries.astype(dtype)
    logits, masked = predict(x, 0)
    outs = [logits]
    for i in range(cfg.num_layers):
      lvl = i % NUM_LEVELS
      x = DecoderLayer(cfg, name=f"layers_{i}", **kw)(x, memories[lvl], positions[lvl], masked, self_masked)
      logits, masked = predict(x, (i + 1) % NUM_LEVELS)
      outs.append(logits)
    out = jnp.stack(outs)
    return jnp.where(valid[None, :, :, None, None], out, jnp.zeros((), out.dtype))
