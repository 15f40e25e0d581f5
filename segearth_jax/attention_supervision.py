"""Spatial attention supervision L_S (method.md §3) on the [SEG]-row attention maps.

seg_attn [layers, B, K, N]: per layer, heads summed, post-softmax attention from [SEG] row k to image
token j (what Phi returns). grid [B, K, N] or [B, K, G, G]: 1 on the target's patches (data/preprocess.py
makes it: `loss.ls_target`).

paper:    A = mean over layers and heads; a = mean of A over background patches;
          L_row = -log(mean over foreground patches of (A - a)^2).
baseline: A_l = heads summed in layer l; same expression with +1e-8 inside the log; summed over layers.
Rows that are invalid (padding [SEG] slots) or have an empty foreground are skipped. The loss is the sum
over the remaining rows divided by (`divisor`): 'kept' the number of remaining rows; 'all' the number of
valid [SEG] rows, empty-foreground ones included (the authors' batchmean over every [SEG] of the batch).
0 when there is nothing to divide by. A row with an empty background (target covers every patch) uses
a = 0: there is no background level to contrast with, so the loss simply rewards attention mass on the
target; this keeps the row (the paper does not say) and stays finite.
"""
from __future__ import annotations

import jax.numpy as jnp


def _row_terms(A, fg, bg):
  """A, fg, bg [..., N] -> mean over fg of (A - a)^2, [...] (fg count clamped to 1)."""
  n_bg = bg.sum(-1)
  a = (A * bg).sum(-1) / jnp.maximum(n_bg, 1.0)
  a = jnp.where(n_bg > 0, a, 0.0)
  return (fg * (A - a[..., None]) ** 2).sum(-1) / jnp.maximum(fg.sum(-1), 1.0)


def ls_loss(seg_attn, grid, seg_valid, *, num_heads: int, form: str = "paper", divisor: str = "kept"):
  seg_attn = seg_attn.astype(jnp.float32)
  n_layers, b, k, n = seg_attn.shape
  fg = (grid.reshape(b, k, -1).astype(jnp.float32) > 0.5).astype(jnp.float32)
  if fg.shape[-1] != n:
    raise ValueError(f"grid has {fg.shape[-1]} patches but seg_attn has {n} image columns")
  bg = 1.0 - fg
  if divisor not in ("kept", "all"):
    raise ValueError(f"L_S divisor must be 'kept' or 'all', got {divisor!r}")
  valid = seg_valid.astype(bool) & (fg.sum(-1) > 0)                  # [B, K]
  if form == "paper":
    A = seg_attn.sum(0) / (n_layers * num_heads)
    m = _row_terms(A, fg, bg)
    # double where: skipped rows see log(1) so their (unused) gradient stays finite
    per_row = -jnp.log(jnp.where(valid, m, 1.0))
  elif form == "baseline":
    m = _row_terms(seg_attn, fg[None], bg[None])                     # [layers, B, K]
    per_row = -jnp.log(jnp.where(valid[None], m, 1.0) + 1e-8).sum(0)
  else:
    raise ValueError(f"L_S form must be 'paper' or 'baseline', got {form!r}")
  per_row = jnp.where(valid, per_row, 0.0)
  count = valid.sum() if divisor == "kept" else seg_valid.astype(bool).sum()
  return per_row.sum() / jnp.maximum(count, 1).astype(jnp.float32)
