"""The multimodal LLM (Mipha-style): SigLIP -> projector -> image tokens spliced into the Phi-2 input.

Submodules 'vision', 'projector', 'llm' (the names the Mipha and authors' converters use). ``MLLM`` is the
part of SegEarth-R2 (models/segearth.py subclasses it) that turns an image and a prompt into logits,
hidden states and the [SEG]->image attention; alone it is what stage-1 text pre-training and the Mipha
import/export run.

Batch keys read (see data/batch.py): siglip_image [B,S,S,3] (normalised, NHWC), input_ids [B,L],
attention_mask [B,L], image_start [B] (first of the presets.image_tokens(config) image-token rows) and,
with ``with_seg_attn``, seg_positions [B,K].
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn

from segearth_jax import presets
from segearth_jax.models.layers import dtype_of
from segearth_jax.models.phi import Phi
from segearth_jax.models.projector import Projector, splice_image_tokens
from segearth_jax.models.siglip import SiglipVisionTower


def make_llm(cfg) -> Phi:
  """The Phi-2 (+LoRA) of a ModelConfig; generation builds the same one to run params['llm'] step by step."""
  return Phi(cfg.llm, lora=cfg.lora, attention_impl=cfg.attention_impl, remat_policy=cfg.remat_policy,
             scan_layers=cfg.scan_layers, dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype))


class MLLM(nn.Module):
  # a models.segearth.ModelConfig (that module imports this one, so the type is not named here)
  config: Any

  def setup(self):
    c = self.config
    dtype, pdtype = dtype_of(c.dtype), dtype_of(c.param_dtype)
    self.vision = SiglipVisionTower(c.vision, dtype=dtype, param_dtype=pdtype, scan_layers=c.scan_layers,
                                    remat_policy=c.remat_policy, attention_impl=c.attention_impl)
    self.projector = Projector(c.vision.hidden_size, c.llm.hidden_size, c.projector_hidden_act,
                               dtype=dtype, param_dtype=pdtype)
    self.llm = make_llm(c)

  def prompt_embeds(self, siglip_image, input_ids, image_start):
    """Token embeddings [B,L,D] with the projected image features written over the image-token rows."""
    image = self.projector(self.vision(siglip_image))
    tokens = self.llm.embed(input_ids)
    return splice_image_tokens(tokens, image.astype(tokens.dtype), image_start)

  def language(self, batch: dict, *, train: bool = False, with_seg_attn: bool = True) -> dict:
    """Image + prompt -> the LLM's dict(logits [B,L,V], hidden [B,L,D] (after the final LayerNorm),
    seg_attn [layers,B,K,N] or None, cache None); no mask head. ``train`` turns on LoRA dropout."""
    embeds = self.prompt_embeds(batch["siglip_image"], batch["input_ids"], batch["image_start"])
    return self.llm(embeds, batch["attention_mask"],
                    seg_positions=batch["seg_positions"] if with_seg_attn else None,
                    image_start=batch["image_start"], n_image_tokens=presets.image_tokens(self.config),
                    deterministic=not train)

  def __call__(self, batch: dict, *, train: bool = False, with_seg_attn: bool = True) -> dict:
    return self.language(batch, train=train, with_seg_attn=with_seg_attn)
