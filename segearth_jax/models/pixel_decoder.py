"""Mask2Former pixel decoder: deformable-attention encoder on strides 8/16/32 + FPN to stride-4 mask features.

Semantics follow transformers' ``Mask2FormerPixelDecoder`` (= detectron2's ``MSDeformAttnPixelDecoder``):
- levels are ordered low resolution first (stride 32, 16, 8): input projections, level embeddings and
  the token sequence all use that order, and so do the returned multi-scale features;
- post-norm encoder layers (deformable self-attention, ReLU FFN), reference points at pixel centres;
- FPN: 1x1 lateral conv + GroupNorm on the stride-4 map, plus the stride-8 output upsampled bilinearly
  (align_corners=False), then 3x3 conv + GroupNorm + ReLU; a 1x1 conv gives the mask features.
  ``fpn`` picks the variant: 'mask2former' (transformers / detectron2: the two FPN convs have no bias, no
  ReLU after the lateral GroupNorm) or 'authors' (SegEarth-R1/R2's msdeformattn.py: both FPN convs have a
  bias, and the lateral path is Conv2d -> GroupNorm -> ReLU too; the biases are params 'conv/bias').
NHWC throughout; flattening a [B,h,w,C] map row-major is HF's NCHW ``flatten(2)`` token order.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from segearth_jax.errors import UserError
from segearth_jax.models.deformable_attention import MultiscaleDeformableAttention
from segearth_jax.models.layers import (config_from_dict, dense, dtype_of, layer_norm, remat_policy,
                                        sine_position_embedding)

GROUPS = 32       # GroupNorm(32, C) everywhere, as HF/detectron2: widths must be multiples of 32
LN_EPS = 1e-5     # torch.nn.LayerNorm / GroupNorm default
FPN_VARIANTS = ("mask2former", "authors")


@dataclasses.dataclass(frozen=True)
class PixelDecoderConfig:
  feature_channels: tuple[int, ...]          # backbone channels, strides 4/8/16/32 (Swin-B: 128..1024)
  feature_size: int = 256
  mask_feature_size: int = 256
  encoder_layers: int = 6
  num_attention_heads: int = 8
  encoder_n_points: int = 4                  # HF hard-codes 4
  encoder_feedforward_dim: int = 1024
  num_feature_levels: int = 3                # HF hard-codes 3 (strides 8/16/32)
  feature_strides: tuple[int, ...] = (4, 8, 16, 32)
  common_stride: int = 4
  deform_attn_impl: str = "xla"              # kernel seam, see deformable_attention.IMPLS
  fpn: str = "mask2former"                   # FPN variant, see the module docstring (FPN_VARIANTS)

  def __post_init__(self):
    if self.fpn not in FPN_VARIANTS:
      raise UserError(f"model.pixel_decoder: fpn={self.fpn!r}; choose one of {FPN_VARIANTS}")
    if self.feature_size % GROUPS:
      raise UserError(f"model.pixel_decoder: feature_size={self.feature_size} must be a multiple of {GROUPS} "
                      "(GroupNorm)")
    if len(self.feature_channels) != len(self.feature_strides):
      raise UserError(f"model.pixel_decoder: {len(self.feature_channels)} feature_channels for "
                      f"{len(self.feature_strides)} feature_strides")
    if self.num_feature_levels > len(self.feature_channels):
      raise UserError(f"model.pixel_decoder: num_feature_levels={self.num_feature_levels} > "
                      f"{len(self.feature_channels)} backbone features")

  @property
  def num_fpn_levels(self) -> int:
    """Backbone maps finer than the encoder's finest level that the FPN adds (1: stride 4)."""
    finest = min(self.feature_strides[-self.num_feature_levels:])
    return int(round(math.log2(finest) - math.log2(self.common_stride)))

  @classmethod
  def from_dict(cls, cfg: Mapping[str, Any], feature_channels: Sequence[int]) -> "PixelDecoderConfig":
    """From a presets ``pixel_decoder`` ConfigDict (or plain dict; strict) and the backbone's channels."""
    return config_from_dict(cls, cfg, "model.pixel_decoder",
                            feature_channels=tuple(int(c) for c in feature_channels))

  @classmethod
  def from_hf(cls, m2f_config) -> "PixelDecoderConfig":
    """From a transformers ``Mask2FormerConfig`` (Swin backbone: channels embed_dim * 2**stage)."""
    bc = m2f_config.backbone_config
    if hasattr(bc, "embed_dim") and hasattr(bc, "depths"):
      all_channels = [int(bc.embed_dim * 2 ** i) for i in range(len(bc.depths))]
      stages = [f"stage{i + 1}" for i in range(len(bc.depths))]
      out = list(getattr(bc, "out_features", None) or stages)
      channels = tuple(all_channels[stages.index(o)] for o in out)
    elif hasattr(bc, "hidden_sizes"):
      channels = tuple(bc.hidden_sizes)
    else:
      raise ValueError(f"cannot read backbone channels from {type(bc).__name__}")
    return cls(feature_channels=channels, feature_size=m2f_config.feature_size,
               mask_feature_size=m2f_config.mask_feature_size, encoder_layers=m2f_config.encoder_layers,
               num_attention_heads=m2f_config.num_attention_heads, encoder_n_points=4,
               encoder_feedforward_dim=m2f_config.encoder_feedforward_dim, num_feature_levels=3,
               feature_strides=tuple(m2f_config.feature_strides), common_stride=m2f_config.common_stride)


# ------------------------------------------------------------------------------------ static helpers
def reference_points(spatial_shapes) -> np.ndarray:
  """[1, S, L, 2] (x, y) pixel centres of every token, the same point on every level (no padding)."""
  pts = []
  for h, w in spatial_shapes:
    yy, xx = np.meshgrid((np.arange(h, dtype=np.float32) + 0.5) / h,
                         (np.arange(w, dtype=np.float32) + 0.5) / w, indexing="ij")
    pts.append(np.stack([xx.reshape(-1), yy.reshape(-1)], -1))
  pts = np.concatenate(pts, 0)
  return np.repeat(pts[None, :, None, :], len(spatial_shapes), axis=2)


def upsample_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """[B,h,w,C] -> [B,H,W,C], torch ``interpolate(mode='bilinear', align_corners=False)`` without antialias."""
  def axis_weights(n_in, n_out):
    src = np.maximum((np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int32), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    frac = (src - i0).astype(np.float32)
    return i0, i1, frac

  (h, w), (oh, ow) = x.shape[1:3], size
  if (h, w) == (oh, ow):
    return x
  i0, i1, fy = axis_weights(h, oh)
  fy = jnp.asarray(fy, x.dtype)[None, :, None, None]
  x = x[:, i0] * (1 - fy) + x[:, i1] * fy
  j0, j1, fx = axis_weights(w, ow)
  fx = jnp.asarray(fx, x.dtype)[None, None, :, None]
  return x[:, :, j0] * (1 - fx) + x[:, :, j1] * fx


# ------------------------------------------------------------------------------------ small modules
def _conv(features, kernel, *, use_bias, name, dtype, param_dtype):
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), padding=((pad, pad), (pad, pad)), use_bias=use_bias,
                 dtype=dtype, param_dtype=param_dtype, name=name,
                 kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                          (None, None, "patch", "head_embed")),
                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("head_embed",)))


def _group_norm(name, dtype, param_dtype):
  return nn.GroupNorm(num_groups=GROUPS, epsilon=LN_EPS, use_fast_variance=False, dtype=dtype,
                      param_dtype=param_dtype, name=name,
                      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)))


class ConvNorm(nn.Module):
  """Conv (params 'conv') + GroupNorm(32) (params 'norm') [+ ReLU]: HF's Sequential(Conv2d, GroupNorm[, ReLU])."""
  features: int
  kernel: int
  use_bias: bool
  relu: bool = False
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = _conv(self.features, self.kernel, use_bias=self.use_bias, name="conv", **kw)(x)
    x = _group_norm("norm", **kw)(x)
    return nn.relu(x) if self.relu else x


class EncoderLayer(nn.Module):
  """Post-norm deformable encoder layer; one step of the ``nn.scan`` over layers."""
  config: PixelDecoderConfig
  spatial_shapes: tuple[tuple[int, int], ...]
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, pos, ref):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))
    attn = MultiscaleDeformableAttention(
        cfg.feature_size, cfg.num_attention_heads, self.spatial_shapes, cfg.encoder_n_points,
        impl=cfg.deform_attn_impl, name="self_attn", **kw)(x, x, ref, pos)
    x = layer_norm(LN_EPS, name="self_attn_layer_norm", **kw)(x + attn)
    h = nn.relu(dense(cfg.encoder_feedforward_dim, ("head_embed", "head_mlp"), name="fc1", **kw)(x))
    h = dense(cfg.feature_size, ("head_mlp", "head_embed"), name="fc2", **kw)(h)
    x = layer_norm(LN_EPS, name="final_layer_norm", **kw)(x + h)
    return x, None


class PixelDecoder(nn.Module):
  """features: 4 maps [B,h,w,Ci] at strides 4/8/16/32 -> (mask_features [B,H/4,W/4,mask_feature_size],
  multi_scale_features: 3 maps [B,h,w,feature_size] at strides 32, 16, 8 — HF's order, the order the
  masked-attention decoder cycles through)."""
  config: PixelDecoderConfig
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  remat_policy: str = "none"   # or a jax.checkpoint_policies name, per encoder layer

  @nn.compact
  def __call__(self, features: Sequence[jax.Array]):
    cfg = self.config
    dtype, param_dtype = dtype_of(self.dtype), dtype_of(self.param_dtype)
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    if len(features) != len(cfg.feature_channels):
      raise ValueError(f"pixel decoder got {len(features)} feature maps, config has {len(cfg.feature_channels)}")
    for i, (f, c) in enumerate(zip(features, cfg.feature_channels)):
      if f.ndim != 4 or f.shape[-1] != c:
        raise ValueError(f"pixel decoder feature {i}: expected [B,h,w,{c}], got {f.shape}")
    n_lv, c_dim = cfg.num_feature_levels, cfg.feature_size
    # Encoder levels, low resolution first (HF's input_projections / level_embed order).
    levels = list(features[::-1][:n_lv])
    b = levels[0].shape[0]
    shapes = tuple((int(f.shape[1]), int(f.shape[2])) for f in levels)

    tokens, pos = [], []
    level_embed = self.param("level_embed", nn.with_logical_partitioning(
        nn.initializers.normal(1.0), ("head_levels", "head_embed")), (n_lv, c_dim), param_dtype)
    for lvl, f in enumerate(levels):
      x = ConvNorm(c_dim, 1, use_bias=True, name=f"input_proj_{lvl}", **kw)(f.astype(dtype))
      tokens.append(x.reshape(b, -1, c_dim))
      pe = sine_position_embedding(*shapes[lvl], c_dim // 2)
      pos.append(jnp.asarray(pe)[None] + level_embed[lvl].astype(jnp.float32)[None, None])
    x = jnp.concatenate(tokens, 1)
    pos = jnp.concatenate(pos, 1).astype(dtype)
    ref = jnp.asarray(reference_points(shapes))

    layer = EncoderLayer
    policy = remat_policy(self.remat_policy)
    if policy is not None:
      layer = nn.remat(EncoderLayer, policy=policy, prevent_cse=False)
    encoder = nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True},
                      in_axes=(nn.broadcast, nn.broadcast), length=cfg.encoder_layers,
                      metadata_params={nn.PARTITION_NAME: "layers"})
    x, _ = encoder(cfg, shapes, name="encoder", **kw)(x, pos, ref)

    outs, start = [], 0
    for h, w in shapes:
      outs.append(x[:, start:start + h * w].reshape(b, h, w, c_dim))
      start += h * w
    # FPN on the maps finer than the encoder's, coarse to fine; HF names them adapter_k / layer_k with
    # k = 1 for the finest backbone map.
    authors = cfg.fpn == "authors"
    for k in range(cfg.num_fpn_levels, 0, -1):
      f = features[k - 1].astype(dtype)
      lat = ConvNorm(c_dim, 1, use_bias=authors, relu=authors, name=f"adapter_{k}", **kw)(f)
      y = lat + upsample_bilinear(outs[-1], lat.shape[1:3]).astype(dtype)
      outs.append(ConvNorm(c_dim, 3, use_bias=authors, relu=True, name=f"layer_{k}", **kw)(y))
    mask_features = _conv(cfg.mask_feature_size, 1, use_bias=True, name="mask_projection", **kw)(outs[-1])
    return mask_features, outs[:3]   # the masked-attention decoder always takes 3 scales
