"""SegEarth-R2: the one model definition used by train, eval, predict and export.

image -> SigLIP -> projector -> spliced into the Phi-2 (+LoRA) input at the image placeholder ->
[SEG] hidden states (final LayerNorm) -> [SEG] projector -> Mask2Former masked-attention decoder over
the Swin / pixel-decoder features of the 1024 copy of the image -> mask logits (one mask per [SEG]).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from segearth_jax.models.layers import dense, dtype_of
from segearth_jax.models.mask_decoder import MaskDecoderConfig
from segearth_jax.models.mask_head import MaskHead
from segearth_jax.models.phi import Phi, PhiConfig
from segearth_jax.models.lora import LoraConfig
from segearth_jax.models.pixel_decoder import PixelDecoderConfig
from segearth_jax.models.projector import Projector, splice_image_tokens
from segearth_jax.models.siglip import SiglipConfig, SiglipVisionTower
from segearth_jax.models.swin import SwinConfig


def n_image_tokens(model_cfg) -> int:
  return (model_cfg.vision.image_size // model_cfg.vision.patch_size) ** 2


def swin_channels(model_cfg) -> tuple[int, ...]:
  return tuple(model_cfg.swin.embed_dim * 2 ** i for i in range(len(model_cfg.swin.depths)))


def gather_rows(x: jax.Array, positions: jax.Array) -> jax.Array:
  """x [B,L,D], positions [B,K] -> [B,K,D]."""
  return jnp.take_along_axis(x, positions[..., None].astype(jnp.int32), axis=1)


def make_llm(c) -> Phi:
  """The Phi-2 (+LoRA) module; generation builds the same one to run params['llm'] step by step."""
  return Phi(PhiConfig.from_dict(c.llm), lora=LoraConfig.from_dict(c.lora) if c.lora.rank else None,
             attention_impl=c.attention_impl, remat_policy=c.remat_policy, scan_layers=c.scan_layers,
             dtype=dtype_of(c.dtype), param_dtype=dtype_of(c.param_dtype))


class SegEarthR2(nn.Module):
  config: Any  # the `model` ConfigDict (frozen)

  def setup(self):
    c = self.config
    dtype, pdtype = dtype_of(c.dtype), dtype_of(c.param_dtype)
    self.vision = SiglipVisionTower(SiglipConfig.from_dict(c.vision), dtype=dtype, param_dtype=pdtype,
                                    scan_layers=c.scan_layers, remat_policy=c.remat_policy,
                                    attention_impl=c.attention_impl)
    self.projector = Projector(c.vision.hidden_size, c.llm.hidden_size, c.projector_hidden_act,
                               dtype=dtype, param_dtype=pdtype)
    self.llm = make_llm(c)
    self.seg_projector = dense(c.mask_decoder.hidden_dim, ("embed", "head_embed"), dtype=dtype,
                               param_dtype=pdtype)
    self.mask_head = MaskHead(SwinConfig.from_dict(c.swin),
                              PixelDecoderConfig.from_dict(c.pixel_decoder, swin_channels(c)),
                              MaskDecoderConfig.from_dict(c.mask_decoder), dtype=dtype, param_dtype=pdtype,
                              remat_policy=c.remat_policy)

  # --- pieces, so generation can run the LLM step by step -------------------------------------------
  def prompt_embeds(self, siglip_image, input_ids, image_start):
    image = self.projector(self.vision(siglip_image))
    tokens = self.llm.embed(input_ids)
    return splice_image_tokens(tokens, image.astype(tokens.dtype), image_start)

  def masks_from_hidden(self, swin_image, seg_hidden, seg_valid):
    queries = self.seg_projector(seg_hidden)
    return self.mask_head(swin_image, queries, seg_valid)

  def language(self, batch: dict, *, train: bool = False, with_seg_attn: bool = True):
    """Image + prompt -> the MLLM alone (logits, hidden, [SEG]->image attention); no mask head."""
    embeds = self.prompt_embeds(batch["siglip_image"], batch["input_ids"], batch["image_start"])
    return self.llm(embeds, batch["attention_mask"],
                    seg_positions=batch["seg_positions"] if with_seg_attn else None,
                    image_start=batch["image_start"], n_image_tokens=n_image_tokens(self.config),
                    deterministic=not train)

  def __call__(self, batch: dict, *, train: bool = False, with_seg_attn: bool = True):
    """Teacher-forced forward: logits, [SEG]->image attention (for L_S), mask logits [P,B,K,h,w]."""
    out = self.language(batch, train=train, with_seg_attn=with_seg_attn)
    seg_hidden = gather_rows(out["hidden"], batch["seg_positions"])
    mask_logits = self.masks_from_hidden(batch["swin_image"], seg_hidden, batch["seg_valid"])
    return dict(logits=out["logits"], seg_attn=out.get("seg_attn"), mask_logits=mask_logits)


def build_model(model_cfg, vocab_size: int | None = None) -> SegEarthR2:
  cfg = ml_collections.ConfigDict(model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else model_cfg)
  if vocab_size is not None:  # grow (never shrink) to fit the tokenizer, padded for even sharding
    mult = cfg.llm.pad_vocab_to_multiple_of or 1
    cfg.llm.vocab_size = max(int(cfg.llm.vocab_size), -(-int(vocab_size) // mult) * mult)
  return SegEarthR2(ml_collections.FrozenConfigDict(cfg))
