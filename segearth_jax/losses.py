"""The objectives: ``text_loss`` (LLaVA next-token loss on answer tokens; alone it is stage-1 text
pre-training) and ``segearth_loss``, the SegEarth-R2 objective L = L_text + 5 BCE + 5 Dice + lambda_S * L_S
(method.md §4). Mask terms live in mask_losses.py, L_S in attention_supervision.py."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from segearth_jax.attention_supervision import ls_loss
from segearth_jax.data.batch import IGNORE
from segearth_jax.mask_losses import mask_loss

def text_loss(logits, labels):
  """logits [B,L,V], labels [B,L] -> shifted cross-entropy: logits[:, t] predicts labels[:, t+1]; mean over
  labels != IGNORE (0 if none)."""
  logits = logits[:, :-1].astype(jnp.float32)
  target = labels[:, 1:]
  valid = target != IGNORE
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, jnp.where(valid, target, 0)[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return jnp.where(valid, nll, 0.0).sum() / jnp.maximum(valid.sum(), 1).astype(jnp.float32)


def segearth_loss(outputs: dict, batch: dict, rng: jax.Array, loss_cfg, num_heads: int) -> tuple[jax.Array, dict]:
  terms = {}
  terms["text"] = text_loss(outputs["logits"], batch["labels"])
  m = mask_loss(outputs["mask_logits"].astype(jnp.float32), batch["masks"], batch["seg_valid"], rng,
                num_points=loss_cfg.num_points, oversample_ratio=loss_cfg.oversample_ratio,
                importance_sample_ratio=loss_cfg.importance_sample_ratio)
  terms["bce"], terms["dice"] = m["bce"], m["dice"]
  total = loss_cfg.text_weight * terms["text"] + loss_cfg.bce_weight * m["bce"] + loss_cfg.dice_weight * m["dice"]
  if loss_cfg.lambda_s and outputs.get("seg_attn") is not None:
    grid = batch["mask_grid"].reshape(batch["mask_grid"].shape[:2] + (-1,))
    terms["ls"] = ls_loss(outputs["seg_attn"].astype(jnp.float32), grid, batch["seg_valid"],
                          num_heads=num_heads, form=loss_cfg.ls_form, divisor=loss_cfg.ls_divisor)
    total = total + loss_cfg.lambda_s * terms["ls"]
  terms["total"] = total
  return total, terms
