"""The multimodal LLM (Mipha-style): SigLIP -> projector -> image tokens spliced into the Phi-2 input.

Submodules 'vision', 'projector', 'llm' (the same names the full SegEarth-R2 model and the Mipha
converter use). ``text_loss`` is the LLaVA next-token loss on answer tokens.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from segearth_jax.models.layers import dtype_of
from segearth_jax.models.lora import LoraConfig
from segearth_jax.models.phi import Phi, PhiConfig
from segearth_jax.models.projector import Projector, splice_image_tokens
from segearth_jax.models.siglip import SiglipConfig, SiglipVisionTower

IGNORE_INDEX = -100


def n_image_tokens(model_cfg) -> int:
  return (model_cfg.vision.image_size // model_cfg.vision.patch_size) ** 2


def make_phi(c) -> Phi:
  lora = LoraConfig.from_dict(c.lora) if ("lora" in c and c.lora and c.lora.rank) else None
  return Phi(PhiConfig.from_dict(c.llm), lora=lora, attention_impl=c.get("attention_impl", "plain"),
             remat_policy=c.get("remat_policy", "none"), scan_layers=c.get("scan_layers", True),
             dtype=dtype_of(c.get("dtype", "float32")), param_dtype=dtype_of(c.get("param_dtype", "float32")))


class MLLM(nn.Module):
  config: Any  # the `model` ConfigDict (vision, llm, lora, projector_hidden_act, attention_impl, ...)

  def setup(self):
    c = self.config
    dtype, pdtype = dtype_of(c.get("dtype", "float32")), dtype_of(c.get("param_dtype", "float32"))
    self.vision = SiglipVisionTower(SiglipConfig.from_dict(c.vision), dtype=dtype, param_dtype=pdtype,
                                    scan_layers=c.get("scan_layers", True),
                                    remat_policy=c.get("remat_policy", "none"),
                                    attention_impl=c.get("attention_impl", "plain"))
    self.projector = Projector(c.vision.hidden_size, c.llm.hidden_size, c.get("projector_hidden_act", "gelu"),
                               dtype=dtype, param_dtype=pdtype)
    self.llm = make_phi(c)

  def prompt_embeds(self, pixel_values, input_ids, image_start):
    """Token embeddings with the projected image features written over the image-token rows."""
    image = self.projector(self.vision(pixel_values))
    tokens = self.llm.embed(input_ids)
    return splice_image_tokens(tokens, image.astype(tokens.dtype), image_start)

  def __call__(self, pixel_values, input_ids, attention_mask, image_start, *, seg_positions=None,
               deterministic: bool = True):
    embeds = self.prompt_embeds(pixel_values, input_ids, image_start)
    return self.llm(embeds, attention_mask, seg_positions=seg_positions, image_start=image_start,
                    n_image_tokens=n_image_tokens(self.config), deterministic=deterministic)


def text_loss(logits, labels):
  """Shifted cross-entropy: logits[:, t] predicts labels[:, t+1]; mean over labels != -100 (0 if none)."""
  logits = logits[:, :-1].astype(jnp.float32)
  target = labels[:, 1:]
  valid = target != IGNORE_INDEX
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, jnp.where(valid, target, 0)[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return jnp.where(valid, nll, 0.0).sum() / jnp.maximum(valid.sum(), 1).astype(jnp.float32)
