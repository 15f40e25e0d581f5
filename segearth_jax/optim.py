"""Optimizer and the trainable/frozen split.

Frozen parts are kept out of the differentiated argument altogether: no gradients are computed for
them and they get no optimizer state (the paper freezes SigLIP, the projector, Swin and the LLM base).
A param trains when any component of its path is named in ``config.train.trainable``
(e.g. 'lora' selects every ``.../lora/...`` leaf, 'lm_head' the output layer).
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import jax
import optax
from flax import traverse_util


def is_trainable(path: tuple, names: Iterable[str]) -> bool:
  names = set(names)
  return any(str(p) in names for p in path)


def split_params(params: Mapping, names: Iterable[str]) -> tuple[dict, dict]:
  flat = traverse_util.flatten_dict(dict(params))
  names = tuple(names)
  train = {k: v for k, v in flat.items() if is_trainable(k, names)}
  frozen = {k: v for k, v in flat.items() if not is_trainable(k, names)}
  return traverse_util.unflatten_dict(train), traverse_util.unflatten_dict(frozen)


def merge_params(a: Mapping, b: Mapping) -> dict:
  flat = traverse_util.flatten_dict(dict(a))
  flat.update(traverse_util.flatten_dict(dict(b)))
  return traverse_util.unflatten_dict(flat)


def learning_rate_schedule(train_cfg) -> optax.Schedule:
  steps = max(int(train_cfg.steps), 1)
  warmup = int(round(train_cfg.warmup_ratio * steps))
  if train_cfg.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, train_cfg.lr, max(warmup, 1) if warmup else 0,
                                              steps, end_value=0.0)
  if train_cfg.schedule == "constant":
    return optax.join_schedules([optax.linear_schedule(0.0, train_cfg.lr, max(warmup, 1)),
                                 optax.constant_schedule(train_cfg.lr)], [warmup]) if warmup else \
        optax.constant_schedule(train_cfg.lr)
  raise ValueError(f"unknown schedule {train_cfg.schedule!r}")


def _decay_mask(params: Any):
  # No weight decay on biases, norms and embeddings' 1-d params.
  return jax.tree.map(lambda x: getattr(x, "ndim", 0) > 1, params)


def lr_scale_of(path: tuple, scales: Mapping[str, float]) -> float:
  """The multiplier of the innermost path component named in ``scales`` (1.0 when none is)."""
  for p in reversed(path):
    if str(p) in scales:
      return float(scales[str(p)])
  return 1.0


def scale_by_part(scales: Mapping[str, float]) -> optax.GradientTransformation:
  """Per-part learning rates: multiplies the updates of every leaf under a named part (e.g. a pretrained
  LLM that should move slower than a head trained from scratch); stateless."""
  scales = {str(k): float(v) for k, v in dict(scales).items()}

  def f(updates, params=None):
    del params
    return jax.tree_util.tree_map_with_path(
        lambda path, u: u * lr_scale_of(tuple(getattr(k, "key", k) for k in path), scales), updates)

  return optax.stateless(f) if scales else optax.identity()


def make_optimizer(train_cfg) -> tuple[optax.GradientTransformation, optax.Schedule]:
  schedule = learning_rate_schedule(train_cfg)
  tx = optax.chain(
      optax.clip_by_global_norm(train_cfg.grad_clip) if train_cfg.grad_clip else optax.identity(),
      optax.adamw(schedule, b1=train_cfg.b1, b2=train_cfg.b2, weight_decay=train_cfg.weight_decay,
                  mask=_decay_mask),
      scale_by_part(train_cfg.get("lr_scale", None) or {}),
  )
  return tx, schedule
