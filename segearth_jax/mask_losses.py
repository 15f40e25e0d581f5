"""Point-sampled mask losses (Mask2Former): sigmoid BCE and Dice on importance-sampled points.

For every prediction (the initial query and each decoder layer) and every mask: draw
``oversample_ratio * num_points`` uniform points, keep the ``importance_sample_ratio * num_points`` most
uncertain ones (uncertainty = -|logit|), add uniform points for the rest; sample logits and GT there by
bilinear interpolation (grid_sample, align_corners=False, zero padding); BCE = mean over points, Dice = 1 -
(2 sum(p t) + 1) / (sum p + sum t + 1). Losses sum over real masks and divide by max(#real masks, 1);
summing over predictions is Mask2Former's auxiliary loss. Matching is by order (one [SEG] per GT mask).
Static shapes throughout; the key is explicit.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def point_sample(img: jnp.ndarray, coords: jnp.ndarray) -> jnp.ndarray:
  """img [M,H,W], coords [M,N,2] as (x, y) in [0,1] -> [M,N].

  torch grid_sample(2*coords-1, mode='bilinear', align_corners=False, padding_mode='zeros'): pixel
  centres sit at (i + 0.5) / size; taps outside the image count as 0.
  """
  m, h, w = img.shape
  x = coords[..., 0] * w - 0.5
  y = coords[..., 1] * h - 0.5
  x0, y0 = jnp.floor(x), jnp.floor(y)
  fx, fy = x - x0, y - y0
  x0, y0 = x0.astype(jnp.int32), y0.astype(jnp.int32)
  flat = img.reshape(m, h * w)
  out = 0.0
  for dy, wy in ((0, 1.0 - fy), (1, fy)):
    for dx, wx in ((0, 1.0 - fx), (1, fx)):
      xi, yi = x0 + dx, y0 + dy
      inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
      idx = jnp.clip(yi, 0, h - 1) * w + jnp.clip(xi, 0, w - 1)
      v = jnp.take_along_axis(flat, idx, axis=1)
      out = out + jnp.where(inside, v, 0.0) * (wx * wy)
  return out


def sample_points(logits: jnp.ndarray, rng, num_points: int, oversample_ratio: float,
                  importance_sample_ratio: float) -> jnp.ndarray:
  """logits [M,h,w] -> point coords [M,num_points,2] (most uncertain first, then uniform)."""
  m = logits.shape[0]
  n_over = int(num_points * oversample_ratio)
  n_imp = int(importance_sample_ratio * num_points)
  k_over, k_rand = jax.random.split(rng)
  parts = []
  if n_imp > 0:
    cand = jax.random.uniform(k_over, (m, n_over, 2), jnp.float32)
    unc = -jnp.abs(point_sample(jax.lax.stop_gradient(logits).astype(jnp.float32), cand))
    _, idx = jax.lax.top_k(unc, n_imp)
    parts.append(jnp.take_along_axis(cand, idx[..., None], axis=1))
  if num_points - n_imp > 0:
    parts.append(jax.random.uniform(k_rand, (m, num_points - n_imp, 2), jnp.float32))
  return jax.lax.stop_gradient(jnp.concatenate(parts, axis=1))


def point_bce_dice(point_logits, point_labels):
  """[M,N] -> per-mask BCE (mean over points) and Dice."""
  bce = jnp.mean(jnp.maximum(point_logits, 0) - point_logits * point_labels
                 + jnp.log1p(jnp.exp(-jnp.abs(point_logits))), axis=-1)
  p = jax.nn.sigmoid(point_logits)
  dice = 1.0 - (2.0 * jnp.sum(p * point_labels, -1) + 1.0) / (jnp.sum(p, -1) + jnp.sum(point_labels, -1) + 1.0)
  return bce, dice


def mask_loss(pred_logits, gt_masks, valid, rng, *, num_points: int = 12544, oversample_ratio: float = 3.0,
              importance_sample_ratio: float = 0.75) -> dict:
  """pred_logits [P,B,K,h,w], gt_masks [B,K,H,W] (0/1), valid [B,K] bool -> dict(bce, dice, per_layer_bce [P],
  per_layer_dice [P]). ``bce``/``dice`` are the sums over the P predictions (unweighted)."""
  p_, b, k, h, w = pred_logits.shape
  gt = gt_masks.reshape(b * k, *gt_masks.shape[-2:]).astype(jnp.float32)
  weight = valid.reshape(b * k).astype(jnp.float32)
  n = jnp.maximum(jnp.sum(weight), 1.0)

  def one(logits, key):
    logits = logits.reshape(b * k, h, w).astype(jnp.float32)
    coords = sample_points(logits, key, num_points, oversample_ratio, importance_sample_ratio)
    labels = jax.lax.stop_gradient(point_sample(gt, coords))
    bce, dice = point_bce_dice(point_sample(logits, coords), labels)
    real = weight > 0   # where, not multiply: a padded slot's NaN/inf must not leak in
    return jnp.sum(jnp.where(real, bce, 0.0)) / n, jnp.sum(jnp.where(real, dice, 0.0)) / n

  keys = jax.random.split(rng, p_)
  per_bce, per_dice = jax.vmap(one)(pred_logits, keys)
  return dict(bce=jnp.sum(per_bce), dice=jnp.sum(per_dice), per_layer_bce=per_bce, per_layer_dice=per_dice)
