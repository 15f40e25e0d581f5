"""Phi-2 decoder (transformers' PhiForCausalLM) in Flax Linen, with LoRA, an attention switch, the
[SEG]-row attention for L_S, and a static-size KV cache.

Block (parallel): h + attn(LN(h)) + mlp(LN(h)); partial rotary (rotate-half) on the first
int(head_dim * partial_rotary_factor) dims of q and k; final LayerNorm; lm_head with bias.
Dropout: only LoRA dropout (Phi-2's resid/embd dropout are 0 in the checkpoints we fine-tune from).

Attention masks (attention.AttentionMask): without a cache, attention_mask [B, L] must be right-padded
(each row's real tokens a prefix, as data/ and generate.py build it): 'fused' reads only its row sums
(the mask-free causal form, the one cuDNN takes) and 'plain' the dense mask built from it. With a cache
every kernel takes the dense mask (its query slots are not 0..L-1 and its valid slots need not be a prefix).

KV cache: dict(k, v [layers, B, S, Hkv, Dh], mask [B, S] (slot holds a real token), index [B] (slot
where the current chunk's first token goes)). A chunk of L tokens is written at slots index..index+L-1
and may attend to valid slots <= its own; positions default to the slot numbers.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from segearth_jax.errors import UserError
from segearth_jax.models import attention as attn_lib
from segearth_jax.models.layers import activation, config_from_dict, dtype_of, layer_norm, remat_policy
from segearth_jax.models.lora import LoraConfig, LoraDense

@dataclasses.dataclass(frozen=True)
class PhiConfig:
  vocab_size: int = 51200
  hidden_size: int = 2560
  intermediate_size: int = 10240
  num_hidden_layers: int = 32
  num_attention_heads: int = 32
  num_key_value_heads: int | None = None   # None: = num_attention_heads (Phi-2)
  partial_rotary_factor: float = 0.4
  rope_theta: float = 10000.0
  layer_norm_eps: float = 1e-5
  max_position_embeddings: int = 2048
  hidden_act: str = "gelu_new"
  pad_vocab_to_multiple_of: int = 64   # used by resize_token_embeddings; params keep vocab_size rows

  def __post_init__(self):
    if not self.num_key_value_heads:
      object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
    if self.hidden_size % self.num_attention_heads or self.num_attention_heads % self.num_key_value_heads:
      raise UserError(f"model.llm: hidden_size {self.hidden_size} / num_attention_heads {self.num_attention_heads} / "
                      f"num_key_value_heads {self.num_key_value_heads} must divide evenly")
    if self.rotary_dim % 2:  # transformers' rotate-half cannot handle it either
      raise UserError(f"model.llm: rotary dim int(head_dim {self.head_dim} * partial_rotary_factor "
                      f"{self.partial_rotary_factor}) = {self.rotary_dim} must be even")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def rotary_dim(self) -> int:
    return int(self.head_dim * self.partial_rotary_factor)

  @classmethod
  def from_dict(cls, cfg: Mapping[str, Any]) -> "PhiConfig":
    """From a presets ``llm`` ConfigDict (or any mapping with the same field names; strict)."""
    return config_from_dict(cls, cfg, "model.llm")

  @classmethod
  def from_hf(cls, hf) -> "PhiConfig":
    rope = getattr(hf, "rope_parameters", None) or {}
    kv = getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads
    return cls(vocab_size=hf.vocab_size, hidden_size=hf.hidden_size, intermediate_size=hf.intermediate_size,
               num_hidden_layers=hf.num_hidden_layers, num_attention_heads=hf.num_attention_heads,
               num_key_value_heads=kv,
               partial_rotary_factor=rope.get("partial_rotary_factor", getattr(hf, "partial_rotary_factor", 0.5)),
               rope_theta=rope.get("rope_theta", getattr(hf, "rope_theta", 10000.0)),
               layer_norm_eps=hf.layer_norm_eps, max_position_embeddings=hf.max_position_embeddings,
               hidden_act=hf.hidden_act)

  def to_hf_dict(self) -> dict:
    """Fields of transformers' PhiConfig (for config.json on export)."""
    return dict(model_type="phi", architectures=["PhiForCausalLM"], vocab_size=self.vocab_size,
                hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
                num_key_value_heads=self.num_key_value_heads, partial_rotary_factor=self.partial_rotary_factor,
                rope_theta=self.rope_theta, layer_norm_eps=self.layer_norm_eps,
                max_position_embeddings=self.max_position_embeddings, hidden_act=self.hidden_act,
                resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0, qk_layernorm=False,
                tie_word_embeddings=False)


def init_cache(config: PhiConfig, batch: int, size: int, dtype=jnp.float32) -> dict:
  shape = (config.num_hidden_layers, batch, size, config.num_key_value_heads, config.head_dim)
  return dict(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
              mask=jnp.zeros((batch, size), jnp.int32), index=jnp.zeros((batch,), jnp.int32))


def _write_rows(buf, new, index):
  """buf [B, S, ...] <- new [B, L, ...] at per-row slot index[b]."""
  def one(b, n, i):
    return jax.lax.dynamic_update_slice_in_dim(b, n.astype(b.dtype), i, axis=0)
  return jax.vmap(one)(buf, new, index)


class PhiAttention(nn.Module):
  config: PhiConfig
  lora: LoraConfig | None
  attention_impl: str
  n_image_tokens: int
  deterministic: bool
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x, masks, positions, seg_positions, image_start, layer_cache, write_index):
    c = self.config
    b, l, _ = x.shape

    def proj(name, n_heads, axes=("embed", "heads")):
      lora = self.lora if (self.lora is not None and name in self.lora.targets) else None
      return LoraDense(n_heads * c.head_dim, axes, lora=lora, deterministic=self.deterministic,
                       dtype=self.dtype, param_dtype=self.param_dtype, name=name)(x)

    q = proj("q_proj", c.num_attention_heads).reshape(b, l, c.num_attention_heads, c.head_dim)
    k = proj("k_proj", c.num_key_value_heads).reshape(b, l, c.num_key_value_heads, c.head_dim)
    v = proj("v_proj", c.num_key_value_heads).reshape(b, l, c.num_key_value_heads, c.head_dim)
    q = nn.with_logical_constraint(q, ("activation_batch", "activation_length", "activation_heads", "activation_kv"))
    q = attn_lib.apply_rotary(q, positions, c.rotary_dim, c.rope_theta)
    k = attn_lib.apply_rotary(k, positions, c.rotary_dim, c.rope_theta)
    new_cache = None
    if layer_cache is not None:
      k = _write_rows(layer_cache["k"], k, write_index)
      v = _write_rows(layer_cache["v"], v, write_index)
      new_cache = dict(k=k, v=v)
      k, v = k.astype(self.dtype), v.astype(self.dtype)
    scale = c.head_dim ** -0.5
    seg = None
    if self.attention_impl == "plain":
      out, probs = attn_lib.plain_attention(q, k, v, masks.dense, scale)
      if seg_positions is not None:
        seg = attn_lib.seg_rows_from_probs(probs, seg_positions, image_start, self.n_image_tokens)
    else:
      if masks.dense is not None:
        out = attn_lib.fused_attention(q, k, v, scale, attention_impl=self.attention_impl, mask=masks.dense)
      else:
        out = attn_lib.fused_attention(q, k, v, scale, attention_impl=self.attention_impl, is_causal=True,
                                       kv_lengths=masks.kv_lengths)
      if seg_positions is not None:
        seg = attn_lib.seg_rows_recomputed(q, k, masks.seg, scale, seg_positions, image_start,
                                           self.n_image_tokens)
    out = out.reshape(b, l, c.num_attention_heads * c.head_dim)
    out = LoraDense(c.hidden_size, ("heads", "embed"), dtype=self.dtype, param_dtype=self.param_dtype,
                    name="dense")(out)
    return out, new_cache, seg


class PhiMLP(nn.Module):
  config: PhiConfig
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x):
    c = self.config
    h = LoraDense(c.intermediate_size, ("embed", "mlp"), dtype=self.dtype, param_dtype=self.param_dtype,
                  name="fc1")(x)
    h = nn.with_logical_constraint(h, ("activation_batch", "activation_length", "activation_mlp"))
    h = activation(c.hidden_act)(h)
    return LoraDense(c.hidden_size, ("mlp", "embed"), dtype=self.dtype, param_dtype=self.param_dtype,
                     name="fc2")(h)


class PhiBlock(nn.Module):
  config: PhiConfig
  lora: LoraConfig | None = None
  attention_impl: str = "plain"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h, layer_cache, masks, positions, seg_positions, image_start, write_index,
               n_image_tokens: int = 0, deterministic: bool = True):
    x = layer_norm(self.config.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                   name="input_layernorm")(h)
    a, new_cache, seg = PhiAttention(self.config, self.lora, self.attention_impl, n_image_tokens,
                                     deterministic, self.dtype, self.param_dtype, name="self_attn")(
        x, masks, positions, seg_positions, image_start, layer_cache, write_index)
    m = PhiMLP(self.config, self.dtype, self.param_dtype, name="mlp")(x)
    h = (h + a + m).astype(self.dtype)
    h = nn.with_logical_constraint(h, ("activation_batch", "activation_length", "activation_embed"))
    return h, (new_cache, seg)


def _block_class(policy_name: str, scan: bool):
  policy = remat_policy(policy_name)
  if policy is None:
    return PhiBlock
  # static: n_image_tokens, deterministic (argnums count self)
  return nn.remat(PhiBlock, policy=policy, prevent_cse=not scan, static_argnums=(8, 9))


class Phi(nn.Module):
  config: PhiConfig
  lora: LoraConfig | None = None
  attention_impl: str = "plain"
  remat_policy: str = "none"
  scan_layers: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    c = self.config
    if self.attention_impl not in attn_lib.ATTENTION_IMPLS:
      raise ValueError(f"attention_impl must be one of {attn_lib.ATTENTION_IMPLS}, got {self.attention_impl!r}")
    self.embed_tokens = nn.Embed(
        c.vocab_size, c.hidden_size, dtype=dtype_of(self.dtype), param_dtype=dtype_of(self.param_dtype),
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")))
    self.final_layernorm = layer_norm(c.layer_norm_eps, dtype=dtype_of(self.dtype),
                                      param_dtype=dtype_of(self.param_dtype))
    self.lm_head = LoraDense(c.vocab_size, ("embed", "vocab"), dtype=dtype_of(self.dtype),
                             param_dtype=dtype_of(self.param_dtype))
    block_kw = dict(config=c, lora=self.lora, attention_impl=self.attention_impl,
                    dtype=dtype_of(self.dtype), param_dtype=dtype_of(self.param_dtype))
    if self.scan_layers:
      stack = nn.scan(_block_class(self.remat_policy, True), variable_axes={"params": 0},
                      split_rngs={"params": True, "dropout": True},
                      in_axes=(0,) + (nn.broadcast,) * 7, length=c.num_hidden_layers,
                      metadata_params={nn.PARTITION_NAME: "layers"})
      self.layers = stack(**block_kw)
    else:  # params layers_0, layers_1, ... (the converters expect scan_layers=True)
      self.layers = [_block_class(self.remat_policy, False)(**block_kw) for _ in range(c.num_hidden_layers)]

  def embed(self, input_ids):
    return self.embed_tokens(input_ids)

  def __call__(self, inputs_embeds, attention_mask=None, positions=None, *, seg_positions=None,
               image_start=None, n_image_tokens: int = 0, deterministic: bool = True, cache=None):
    c = self.config
    dtype = dtype_of(self.dtype)
    b, l, _ = inputs_embeds.shape
    if attention_mask is None:
      attention_mask = jnp.ones((b, l), jnp.int32)
    if self.is_initializing():  # init from embeddings must still create the embedding table
      self.embed_tokens(jnp.zeros((1, 1), jnp.int32))
    if cache is not None:
      write_index = cache["index"].astype(jnp.int32)
      slots = write_index[:, None] + jnp.arange(l, dtype=jnp.int32)[None]
      key_valid = _write_rows(cache["mask"], attention_mask.astype(cache["mask"].dtype), write_index)
    else:
      write_index = None
      slots = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32)[None], (b, l))
      key_valid = attention_mask
    if positions is None:
      positions = slots
    if cache is None and self.attention_impl != "plain":
      masks = attn_lib.AttentionMask(kv_lengths=attention_mask.astype(jnp.int32).sum(-1))
    else:
      masks = attn_lib.AttentionMask(dense=attn_lib.causal_mask(slots, key_valid))
    if seg_positions is not None:
      if image_start is None or n_image_tokens <= 0:
        raise ValueError("seg_positions needs image_start and n_image_tokens > 0")
      seg_positions = seg_positions.astype(jnp.int32)
      image_start = image_start.astype(jnp.int32)
      if self.attention_impl != "plain":  # 'plain' picks the rows out of its full probabilities
        seg_slots = jnp.take_along_axis(slots, seg_positions, axis=1)
        masks = masks._replace(seg=attn_lib.causal_mask(seg_slots, key_valid))

    h = inputs_embeds.astype(dtype)
    h = nn.with_logical_constraint(h, ("activation_batch", "activation_length", "activation_embed"))
    layer_cache = None if cache is None else dict(k=cache["k"], v=cache["v"])
    if self.scan_layers:
      h, (new_layer_cache, seg_attn) = self.layers(
          h, layer_cache, masks, positions, seg_positions, image_start, write_index, n_image_tokens,
          deterministic)
    else:
      caches, segs = [], []
      for i in range(c.num_hidden_layers):
        lc = None if layer_cache is None else jax.tree_util.tree_map(lambda x: x[i], layer_cache)
        h, (nc, s) = self.layers[i](h, lc, masks, positions, seg_positions, image_start, write_index,
                                    n_image_tokens, deterministic)
        caches.append(nc)
        segs.append(s)
      new_layer_cache = None if layer_cache is None else jax.tree_util.tree_map(lambda *x: jnp.stack(x), *caches)
      seg_attn = None if seg_positions is None else jnp.stack(segs)

    hidden = self.final_layernorm(h)
    logits = self.lm_head(hidden)
    logits = nn.with_logical_constraint(logits, ("activation_batch", "activation_length", "activation_vocab"))
    new_cache = None
    if cache is not None:
      new_cache = dict(k=new_layer_cache["k"], v=new_layer_cache["v"], mask=key_valid,
                       index=write_index + l)
    return dict(hidden=hidden, logits=logits, seg_attn=seg_attn, cache=new_cache)
