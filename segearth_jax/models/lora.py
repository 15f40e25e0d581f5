"""LoRA: a Dense whose low-rank update lives in a child module named 'lora' (params a, b).

Layout matches peft's LoRA Linear: y = x W + bias + dropout(x) A^T B^T * (alpha / r); our ``a`` is
lora_A.weight^T ([in, r]) and ``b`` is lora_B.weight^T ([r, out]). The update is kept separate so the
optimizer can select trainable params by the path component 'lora'.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from segearth_jax import sharding as shd
from segearth_jax.errors import UserError
from segearth_jax.models.layers import config_from_dict


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  rank: int = 8
  alpha: float = 16.0
  dropout: float = 0.05
  targets: tuple[str, ...] = ("q_proj", "v_proj")

  def __post_init__(self):
    if self.rank < 1:
      raise UserError(f"model.lora: rank={self.rank} must be >= 1 (the model config's rank 0 means no LoRA)")

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  @classmethod
  def from_dict(cls, cfg: Mapping[str, Any]) -> "LoraConfig":
    """From a presets ``lora`` ConfigDict (or plain dict; strict). Rank 0 is ModelConfig's business."""
    return config_from_dict(cls, cfg, "model.lora")


def _kaiming_uniform_a(key, shape, dtype=jnp.float32):
  # peft initialises lora_A with kaiming_uniform_(a=sqrt(5)) on the [r, in] weight: bound = 1/sqrt(in).
  bound = 1.0 / math.sqrt(shape[0])
  return jax.random.uniform(key, shape, dtype, -bound, bound)


class LoraUpdate(nn.Module):
  """The low-rank branch alone: dropout(x) @ a @ b * scale."""
  features: int
  cfg: LoraConfig
  axes: Sequence[str | None]
  deterministic: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    a = self.param("a", nn.with_logical_partitioning(_kaiming_uniform_a, (self.axes[0], "lora_rank")),
                   (x.shape[-1], self.cfg.rank), self.param_dtype)
    b = self.param("b", nn.with_logical_partitioning(nn.initializers.zeros, ("lora_rank", self.axes[-1])),
                   (self.cfg.rank, self.features), self.param_dtype)
    x = nn.Dropout(self.cfg.dropout)(x, deterministic=self.deterministic)
    x = x.astype(self.dtype)
    a = shd.gather_at_use(a, (self.axes[0], "lora_rank"))
    b = shd.gather_at_use(b, ("lora_rank", self.axes[-1]))
    return (x @ a.astype(self.dtype)) @ b.astype(self.dtype) * jnp.asarray(self.cfg.scale, self.dtype)


class LoraDense(nn.Module):
  """nn.Dense-compatible params (kernel [in, out], bias) plus an optional 'lora' child."""
  features: int
  axes: Sequence[str | None]
  lora: LoraConfig | None = None
  use_bias: bool = True
  deterministic: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.lecun_normal(), tuple(self.axes)),
                        (x.shape[-1], self.features), self.param_dtype)
    y = jnp.dot(x.astype(self.dtype), shd.gather_at_use(kernel, self.axes).astype(self.dtype))
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (self.axes[-1],)),
                        (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    if self.lora is not None:
      y = y + LoraUpdate(self.features, self.lora, self.axes, self.deterministic, self.dtype,
                         self.param_dtype, name="lora")(x)
    return y


# ------------------------------------------------------------------ param-tree helpers
def _is_adapted(node) -> bool:
  return isinstance(node, Mapping) and "kernel" in node and "lora" in node


def _merge_kernel(kernel, lora, scale, sign):
  delta = jnp.einsum("...ir,...ro->...io", jnp.asarray(lora["a"], jnp.float32), jnp.asarray(lora["b"], jnp.float32))
  return (jnp.asarray(kernel, jnp.float32) + sign * scale * delta).astype(jnp.asarray(kernel).dtype)


def merge_lora(params: Mapping, lora_cfg: LoraConfig) -> dict:
  """Folds every 'lora' child into its kernel and drops it (the tree of a model built with lora=None).

  Works on nn.scan-stacked kernels too (leading layer axis)."""
  def walk(node):
    if not isinstance(node, Mapping):
      return node
    if _is_adapted(node):
      out = {k: walk(v) for k, v in node.items() if k != "lora"}
      out["kernel"] = _merge_kernel(node["kernel"], node["lora"], lora_cfg.scale, 1.0)
      return out
    return {k: walk(v) for k, v in node.items()}
  return walk(params)


def split_lora(params: Mapping) -> tuple[dict, dict]:
  """(base params without 'lora' children, the 'lora' children alone in the same nesting)."""
  def walk(node):
    if not isinstance(node, Mapping):
      return node, None
    base, lora = {}, {}
    for k, v in node.items():
      if k == "lora":
        lora[k] = v
        continue
      b, l = walk(v)
      base[k] = b
      if l:
        lora[k] = l
    return base, lora
  return walk(params)


def unmerge_lora(merged: Mapping, lora_params: Mapping, lora_cfg: LoraConfig) -> dict:
  """Inverse of merge_lora: subtracts the update from each kernel and re-attaches the 'lora' children
  (``lora_params`` as returned by split_lora)."""
  def walk(node, lnode):
    if not isinstance(node, Mapping):
      return node
    out = {}
    for k, v in node.items():
      out[k] = walk(v, lnode.get(k, {})) if isinstance(lnode, Mapping) else v
    if isinstance(lnode, Mapping) and "lora" in lnode:
      out["kernel"] = _merge_kernel(node["kernel"], lnode["lora"], lora_cfg.scale, -1.0)
      out["lora"] = lnode["lora"]
    return out
  return walk(merged, lora_params)


def is_lora_path(path: Sequence[Any]) -> bool:
  """True for a param path (tuple of keys / jax key entries) inside a 'lora' child."""
  names = [getattr(p, "key", getattr(p, "name", p)) for p in path]
  return "lora" in names


def lora_mask(params) -> Any:
  """Boolean tree: True on LoRA params (for optax.masked / multi_transform)."""
  return jax.tree_util.tree_map_with_path(lambda p, _: is_lora_path(p), params)
