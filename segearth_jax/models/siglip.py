"""SigLIP vision tower (HF `SiglipVisionModel` semantics), without the attention-pooling head.

LLaVA-style models read the hidden state of one layer (`feature_layer`, default -2: the output of the
second-to-last encoder layer, no post-layernorm). Index semantics follow HF's `hidden_states` tuple:
index 0 is the patch+position embeddings, index k the output of encoder layer k. Layers after the
selected one are not run.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from segearth_jax.errors import UserError
from segearth_jax.models import attention as attn_lib
from segearth_jax.models.layers import activation, config_from_dict, dense, dtype_of, layer_norm, remat_policy


@dataclasses.dataclass(frozen=True)
class SiglipConfig:
  hidden_size: int = 1152
  intermediate_size: int = 4304
  num_hidden_layers: int = 27
  num_attention_heads: int = 16
  image_size: int = 384
  patch_size: int = 14
  num_channels: int = 3
  layer_norm_eps: float = 1e-6
  hidden_act: str = "gelu_pytorch_tanh"
  feature_layer: int = -2

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid ** 2

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def feature_index(self) -> int:
    """`feature_layer` as a non-negative index into [embeddings, layer 1 .. layer L]."""
    n = self.num_hidden_layers + 1
    if not -n <= self.feature_layer < n:
      raise UserError(f"model.vision.feature_layer={self.feature_layer}: must be in [{-n}, {n - 1}] "
                      f"for {self.num_hidden_layers} layers")
    return self.feature_layer % n

  @classmethod
  def from_dict(cls, cfg: Mapping[str, Any]) -> "SiglipConfig":
    """From a presets `vision` ConfigDict (or any mapping with the same field names; strict)."""
    return config_from_dict(cls, cfg, "model.vision")

  @classmethod
  def from_hf(cls, hf_config, feature_layer: int = -2) -> "SiglipConfig":
    """From a transformers `SiglipVisionConfig`/`SiglipConfig`, their dict, or a config.json path."""
    if isinstance(hf_config, str):
      with open(hf_config) as f:
        hf_config = json.load(f)
    d = hf_config if isinstance(hf_config, Mapping) else hf_config.to_dict()
    if "vision_config" in d:  # a full SiglipConfig (vision + text)
      d = d["vision_config"]
      d = d if isinstance(d, Mapping) else d.to_dict()
    names = [f.name for f in dataclasses.fields(cls) if f.name != "feature_layer"]
    defaults = cls()
    kw = {n: d.get(n, getattr(defaults, n)) for n in names}
    return cls(**kw, feature_layer=feature_layer)


def _act_constraint(x):
  return nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))


class SiglipAttention(nn.Module):
  config: SiglipConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention_impl: str = "plain"

  @nn.compact
  def __call__(self, x):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, n, _ = x.shape
    split = lambda t: t.reshape(b, n, c.num_attention_heads, c.head_dim)
    q = split(dense(c.hidden_size, ("embed", "heads"), name="q_proj", **kw)(x))
    k = split(dense(c.hidden_size, ("embed", "heads"), name="k_proj", **kw)(x))
    v = split(dense(c.hidden_size, ("embed", "heads"), name="v_proj", **kw)(x))
    if self.attention_impl not in attn_lib.ATTENTION_IMPLS:
      raise UserError(f"attention_impl={self.attention_impl!r}: choose one of {list(attn_lib.ATTENTION_IMPLS)}")
    if self.attention_impl != "plain":  # no mask: the form cuDNN takes
      o = attn_lib.fused_attention(q, k, v, c.head_dim ** -0.5, attention_impl=self.attention_impl)
    else:
      # softmax in float32 (HF eager does the same), then back to the compute dtype
      s = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * c.head_dim ** -0.5
      p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
      o = jnp.einsum("bhqk,bkhd->bqhd", p, v)
    o = o.reshape(b, n, c.hidden_size)
    return dense(c.hidden_size, ("heads", "embed"), name="out_proj", **kw)(o)


class SiglipMLP(nn.Module):
  config: SiglipConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = dense(c.intermediate_size, ("embed", "mlp"), name="fc1", **kw)(x)
    h = activation(c.hidden_act)(h)
    return dense(c.hidden_size, ("mlp", "embed"), name="fc2", **kw)(h)


class SiglipEncoderLayer(nn.Module):
  """Pre-LN block. As a scan body: carry = hidden state; emits it per layer only when `collect`."""
  config: SiglipConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention_impl: str = "plain"
  collect: bool = False

  @nn.compact
  def __call__(self, x, _=None):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = layer_norm(c.layer_norm_eps, name="layer_norm1", **kw)(x)
    x = x + SiglipAttention(c, attention_impl=self.attention_impl, name="self_attn", **kw)(h)
    h = layer_norm(c.layer_norm_eps, name="layer_norm2", **kw)(x)
    x = _act_constraint(x + SiglipMLP(c, name="mlp", **kw)(h))
    return x, (x if self.collect else None)


class SiglipEncoder(nn.Module):
  """`num_hidden_layers` blocks; runs the first `run_layers` of them."""
  config: SiglipConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  scan_layers: bool = True
  remat_policy: str = "none"
  attention_impl: str = "plain"

  @nn.compact
  def __call__(self, x, run_layers: int, collect: bool):
    c = self.config
    n_all = c.num_hidden_layers
    policy = remat_policy(self.remat_policy)
    block = SiglipEncoderLayer
    if policy is not None:
      block = nn.remat(block, policy=policy, prevent_cse=not self.scan_layers)
    kw = dict(config=c, dtype=self.dtype, param_dtype=self.param_dtype,
              attention_impl=self.attention_impl, collect=collect)

    if not self.scan_layers:
      ys = []
      layers = [block(name=f"layers_{i}", **kw) for i in range(n_all)]
      # init touches every layer so the param tree is complete
      for i in range(n_all if self.is_initializing() else run_layers):
        x, y = layers[i](x)
        ys.append(y)
      return x, (jnp.stack(ys) if collect and ys else None)

    def scanned(length):
      return nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                     length=length, metadata_params={nn.PARTITION_NAME: "layers"})

    if self.is_initializing() or run_layers == n_all:
      x, ys = scanned(n_all)(name="layers", **kw)(x, None)
    elif run_layers == 0:
      return x, None
    else:
      # the stacked params hold every layer; scan over the first `run_layers` slices only
      head = lambda t: t[:run_layers]
      part = nn.map_variables(scanned(run_layers), "params",
                              trans_in_fn=lambda vs: jax.tree_util.tree_map(head, vs))
      x, ys = part(name="layers", **kw)(x, None)
    return x, ys


class SiglipEmbeddings(nn.Module):
  """Conv patch embedding (kernel HWIO) + learned position embeddings, row-major over the grid."""
  config: SiglipConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pixel_values):
    c = self.config
    p = c.patch_size
    conv = nn.Conv(
        c.hidden_size, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
        param_dtype=self.param_dtype, name="patch_embedding",
        # flax forbids a repeated logical name, so the two spatial dims stay unnamed (replicated)
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                 (None, None, "patch", "embed")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))
    x = conv(pixel_values.astype(self.dtype))
    b = x.shape[0]
    x = x.reshape(b, -1, c.hidden_size)
    pos = self.param("position_embedding",
                     nn.with_logical_partitioning(nn.initializers.normal(0.02), ("position", "embed")),
                     (c.num_patches, c.hidden_size), self.param_dtype)
    return _act_constraint(x + pos.astype(self.dtype)[None])


class SiglipVisionTower(nn.Module):
  """pixel_values [B,H,W,C] (NHWC, already normalised) -> features [B, N, D] of `feature_layer`.

  With `output_hidden_states=True` returns `(features, hidden_states [L+1,B,N,D], last_hidden_state)`
  where `last_hidden_state` is post-layernormed (HF's `last_hidden_state`); all layers then run.
  """
  config: SiglipConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  scan_layers: bool = True
  remat_policy: str = "none"
  attention_impl: str = "plain"

  @nn.compact
  def __call__(self, pixel_values, output_hidden_states: bool = False):
    c = self.config
    dtype, param_dtype = dtype_of(self.dtype), dtype_of(self.param_dtype)
    b, h, w, ch = pixel_values.shape
    if (h, w, ch) != (c.image_size, c.image_size, c.num_channels):
      raise UserError(f"vision tower: pixel_values are {h}x{w}x{ch} but the config wants "
                      f"{c.image_size}x{c.image_size}x{c.num_channels} (NHWC)")
    x = SiglipEmbeddings(c, dtype=dtype, param_dtype=param_dtype, name="embeddings")(pixel_values)

    idx = c.feature_index
    run = c.num_hidden_layers if output_hidden_states else idx
    enc = SiglipEncoder(c, dtype=dtype, param_dtype=param_dtype, scan_layers=self.scan_layers,
                        remat_policy=self.remat_policy, attention_impl=self.attention_impl,
                        name="encoder")
    emb = x
    x, ys = enc(x, run, output_hidden_states)
    post = layer_norm(c.layer_norm_eps, name="post_layernorm", dtype=dtype, param_dtype=param_dtype)
    if not output_hidden_states:
      if self.is_initializing():
        post(x)  # create its params (they are in every checkpoint) without using them
        return emb  # init ran all layers; the value is not used
      return x
    hidden = jnp.concatenate([emb[None], ys], axis=0)
    return hidden[idx], hidden, post(x)
