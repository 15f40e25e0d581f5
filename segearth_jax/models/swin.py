"""Swin Transformer backbone as Mask2Former uses it (HF `SwinBackbone`, out_features stage1..stage4).

Semantics follow transformers' `SwinBackbone`, which runs its stages with `always_partition=True`:
the window is never clipped to the resolution and every odd block shifts by window_size // 2; a
feature map that is not a multiple of the window is zero-padded (after the block's first LayerNorm)
and cropped back. This is also what the original detectron2 Swin does, so one module serves both
checkpoints. Each stage output (before patch merging) goes through its own LayerNorm.

Layout: NHWC throughout. The blocks of a stage run as one `nn.scan` (params stacked on a leading
'layers' axis, index = HF block index); regular and shifted blocks differ only by a per-step flag
that scales the cyclic shift and the shift mask, so one compiled body serves the whole stage.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from segearth_jax.errors import UserError
from segearth_jax.models.layers import activation, config_from_dict, dense, dtype_of, layer_norm

_TORCH_LN_EPS = 1e-5  # nn.LayerNorm(dim) default: patch-embed norm, merge norm and stage-output norms


@dataclasses.dataclass(frozen=True)
class SwinConfig:
  image_size: int = 1024
  patch_size: int = 4
  num_channels: int = 3
  embed_dim: int = 128
  depths: tuple = (2, 2, 18, 2)
  num_heads: tuple = (4, 8, 16, 32)
  window_size: int = 12
  mlp_ratio: float = 4.0
  layer_norm_eps: float = 1e-5
  hidden_act: str = "gelu"

  def __post_init__(self):
    object.__setattr__(self, "depths", tuple(int(d) for d in self.depths))
    object.__setattr__(self, "num_heads", tuple(int(h) for h in self.num_heads))
    if len(self.depths) != len(self.num_heads):
      raise UserError(f"swin config: depths {self.depths} and num_heads {self.num_heads} differ in length")
    for i, h in enumerate(self.num_heads):
      if self.dims[i] % h:
        raise UserError(f"swin config: stage {i} width {self.dims[i]} is not divisible by num_heads={h}")

  @property
  def num_stages(self) -> int:
    return len(self.depths)

  @property
  def dims(self) -> tuple:
    """Channels of each stage output: embed_dim * 2**i."""
    return tuple(self.embed_dim * 2 ** i for i in range(len(self.depths)))

  def feature_shapes(self, height: int | None = None, width: int | None = None) -> list[tuple]:
    """(h, w, C) of each stage output for an input of height x width (default image_size)."""
    h = -(-(height or self.image_size) // self.patch_size)
    w = -(-(width or self.image_size) // self.patch_size)
    out = []
    for c in self.dims:
      out.append((h, w, c))
      h, w = (h + 1) // 2, (w + 1) // 2
    return out

  @classmethod
  def from_dict(cls, cfg: Mapping[str, Any]) -> "SwinConfig":
    """From a presets `swin` ConfigDict (or any mapping with the same field names; strict)."""
    return config_from_dict(cls, cfg, "model.swin")

  @classmethod
  def from_hf(cls, hf_config) -> "SwinConfig":
    """From a transformers `SwinConfig`, a `Mask2FormerConfig` (its backbone_config), their dict, or
    a config.json path."""
    if isinstance(hf_config, str):
      with open(hf_config) as f:
        hf_config = json.load(f)
    d = hf_config if isinstance(hf_config, Mapping) else hf_config.to_dict()
    if "backbone_config" in d:  # a Mask2FormerConfig
      d = d["backbone_config"]
      d = d if isinstance(d, Mapping) else d.to_dict()
    if d.get("use_absolute_embeddings"):
      raise UserError("swin config: use_absolute_embeddings=True is not supported (Mask2Former's Swin "
                      "has no absolute position embedding)")
    if not d.get("qkv_bias", True):
      raise UserError("swin config: qkv_bias=False is not supported")
    defaults = cls()
    kw = {f.name: d.get(f.name, getattr(defaults, f.name)) for f in dataclasses.fields(cls)}
    for k in ("image_size", "patch_size"):
      if isinstance(kw[k], (list, tuple)):
        if len(set(kw[k])) != 1:
          raise UserError(f"swin config: non-square {k}={kw[k]} is not supported")
        kw[k] = kw[k][0]
    return cls(**kw)


# ---------------------------------------------------------------------------- static tables (numpy)
def relative_position_index(ws: int) -> np.ndarray:
  """[ws*ws, ws*ws] index into the (2ws-1)^2-row bias table: (dh + ws-1) * (2ws-1) + (dw + ws-1)."""
  hh, ww = np.meshgrid(np.arange(ws), np.arange(ws), indexing="ij")
  h, w = hh.reshape(-1), ww.reshape(-1)
  dh = h[:, None] - h[None, :] + ws - 1
  dw = w[:, None] - w[None, :] + ws - 1
  return (dh * (2 * ws - 1) + dw).astype(np.int32)


def shift_mask(hp: int, wp: int, ws: int, shift: int) -> np.ndarray:
  """Additive mask [nWh, nWw, N, N] for shifted windows: 0 within a region, -100 across regions.

  After the cyclic shift, the last `ws` rows/cols of the padded map hold pixels from up to three
  regions (far side, middle, wrapped); tokens attend only within their region (as HF / Swin)."""
  if shift <= 0:
    return np.zeros((hp // ws, wp // ws, ws * ws, ws * ws), np.float32)
  rh = (np.arange(hp) >= hp - ws).astype(np.int32) + (np.arange(hp) >= hp - shift)
  rw = (np.arange(wp) >= wp - ws).astype(np.int32) + (np.arange(wp) >= wp - shift)
  region = rh[:, None] * 3 + rw[None, :]  # [hp, wp]
  win = region.reshape(hp // ws, ws, wp // ws, ws).transpose(0, 2, 1, 3).reshape(hp // ws, wp // ws, -1)
  diff = win[..., None, :] - win[..., :, None]  # [nWh, nWw, N(query), N(key)]
  return np.where(diff != 0, -100.0, 0.0).astype(np.float32)


def _windows(x, ws):
  """[B, Hp, Wp, C] -> [B, nWh, nWw, ws*ws, C] (row-major windows, row-major tokens inside)."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // ws, ws, w // ws, ws, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h // ws, w // ws, ws * ws, c)


def _unwindows(x, ws):
  b, nh, nw, _, c = x.shape
  x = x.reshape(b, nh, nw, ws, ws, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, nh * ws, nw * ws, c)


# ---------------------------------------------------------------------------- modules
class SwinWindowAttention(nn.Module):
  """Multi-head self-attention inside each window, with the learned relative position bias."""
  dim: int
  num_heads: int
  window_size: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask):
    # x: [B, nWh, nWw, N, C]; mask: [nWh, nWw, N, N] additive (zeros for regular blocks)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    ws, nh = self.window_size, self.num_heads
    hd = self.dim // nh
    split = lambda t: t.reshape(*t.shape[:-1], nh, hd)
    q = split(dense(self.dim, ("head_embed", "head_heads"), name="query", **kw)(x))
    k = split(dense(self.dim, ("head_embed", "head_heads"), name="key", **kw)(x))
    v = split(dense(self.dim, ("head_embed", "head_heads"), name="value", **kw)(x))
    table = self.param(
        "relative_position_bias_table",
        nn.with_logical_partitioning(nn.initializers.truncated_normal(0.02), ("position", "head_heads")),
        ((2 * ws - 1) ** 2, nh), self.param_dtype)
    bias = jnp.asarray(table, jnp.float32)[relative_position_index(ws)]  # [N, N, nh]
    bias = bias.transpose(2, 0, 1)  # [nh, N, N]
    s = jnp.einsum("...qhd,...khd->...hqk", q, k).astype(jnp.float32) * hd ** -0.5
    s = s + bias + mask[:, :, None].astype(jnp.float32)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    o = jnp.einsum("...hqk,...khd->...qhd", p, v)
    o = o.reshape(*o.shape[:-2], self.dim)
    return dense(self.dim, ("head_heads", "head_embed"), name="proj", **kw)(o)


class SwinBlock(nn.Module):
  """One Swin block. As a scan body: carry = feature map, xs = shift flag (0 regular, 1 shifted)."""
  config: SwinConfig
  dim: int
  num_heads: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, shifted, mask):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    ws = c.window_size
    b, h, w, _ = x.shape
    hp, wp = -(-h // ws) * ws, -(-w // ws) * ws
    y = layer_norm(c.layer_norm_eps, name="layernorm_before", **kw)(x)
    y = jnp.pad(y, ((0, 0), (0, hp - h), (0, wp - w), (0, 0)))
    # shift = flag * ws//2 (traced): one scan body for regular and shifted blocks
    shift = (shifted * (ws // 2)).astype(jnp.int32)
    y = jnp.roll(y, (-shift, -shift), axis=(1, 2))
    y = _windows(y, ws)
    y = SwinWindowAttention(self.dim, self.num_heads, ws, name="attention", **kw)(
        y, mask * shifted.astype(mask.dtype))
    y = jnp.roll(_unwindows(y, ws), (shift, shift), axis=(1, 2))
    x = x + y[:, :h, :w]
    y = layer_norm(c.layer_norm_eps, name="layernorm_after", **kw)(x)
    y = dense(int(c.mlp_ratio * self.dim), ("head_embed", "head_mlp"), name="fc1", **kw)(y)
    y = dense(self.dim, ("head_mlp", "head_embed"), name="fc2", **kw)(activation(c.hidden_act)(y))
    return x + y, None


class SwinPatchMerging(nn.Module):
  """2x2 neighbours -> channels in the order x0=(0,0), x1=(1,0), x2=(0,1), x3=(1,1) (row, col) ->
  LayerNorm(4C) -> Linear 4C -> 2C (no bias). Odd sizes are zero-padded at the bottom/right."""
  dim: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    _, h, w, _ = x.shape
    x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
    x = jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
    x = layer_norm(_TORCH_LN_EPS, name="norm", **kw)(x)
    return dense(2 * self.dim, ("patch", "head_embed"), use_bias=False, name="reduction", **kw)(x)


class SwinStage(nn.Module):
  config: SwinConfig
  index: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  scan_layers: bool = True

  @nn.compact
  def __call__(self, x):
    c = self.config
    ws, depth = c.window_size, c.depths[self.index]
    _, h, w, _ = x.shape
    mask = jnp.asarray(shift_mask(-(-h // ws) * ws, -(-w // ws) * ws, ws, ws // 2))
    flags = jnp.asarray([i % 2 for i in range(depth)], jnp.float32)
    kw = dict(config=c, dim=c.dims[self.index], num_heads=c.num_heads[self.index],
              dtype=self.dtype, param_dtype=self.param_dtype)
    if self.scan_layers:
      blocks = nn.scan(SwinBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                       in_axes=(0, nn.broadcast), length=depth,
                       metadata_params={nn.PARTITION_NAME: "layers"})(name="blocks", **kw)
      x, _ = blocks(x, flags, mask)
    else:
      for i in range(depth):
        x, _ = SwinBlock(name=f"blocks_{i}", **kw)(x, flags[i], mask)
    return x


class SwinBackbone(nn.Module):
  """pixel_values [B, H, W, C] (NHWC) -> list of stage outputs [B, h_i, w_i, embed_dim * 2**i] at
  strides patch_size * 2**i, each after its own LayerNorm (HF `hidden_states_norms`)."""
  config: SwinConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  scan_layers: bool = True

  @nn.compact
  def __call__(self, pixel_values) -> list:
    c = self.config
    dt, pdt = dtype_of(self.dtype), dtype_of(self.param_dtype)
    kw = dict(dtype=dt, param_dtype=pdt)
    p = c.patch_size
    _, h, w, _ = pixel_values.shape
    x = jnp.pad(pixel_values, ((0, 0), (0, -h % p), (0, -w % p), (0, 0)))  # HF pads bottom/right
    x = nn.Conv(c.embed_dim, (p, p), strides=(p, p), padding="VALID", name="patch_embed", **kw,
                kernel_init=nn.with_logical_partitioning(
                    nn.initializers.lecun_normal(), (None, None, "patch", "head_embed")),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("head_embed",)))(x)
    x = layer_norm(_TORCH_LN_EPS, name="patch_norm", **kw)(x)
    outs = []
    for i in range(c.num_stages):
      x = SwinStage(c, i, scan_layers=self.scan_layers, name=f"stage{i}", **kw)(x)
      outs.append(layer_norm(_TORCH_LN_EPS, name=f"norm_stage{i + 1}", **kw)(x))
      if i < c.num_stages - 1:
        x = SwinPatchMerging(c.dims[i], name=f"merge{i}", **kw)(x)
    return outs
