"""Tiny random HF checkpoints for the conversion tests: SegEarth-R2's parts as transformers builds them
(SigLIP vision tower, LLaVA projector, Phi, Mask2FormerModel), sized by a model ConfigDict, and a Mipha
folder (SigLIP + projector + Phi in one safetensors file, config.json, tokenizer) made from them."""
from __future__ import annotations

import json
import os
import re

import numpy as np
import torch
from safetensors.numpy import save_file

from segearth_jax.convert.mask2former import mask2former_hf_config
from segearth_jax.convert.mipha import mipha_config_dict
from segearth_jax.data.tokenizer import train_toy_tokenizer
from segearth_jax.data.templates import EVAL_PROMPT, PHI_SYSTEM
from segearth_jax.models.segearth import ModelConfig


def state(module) -> dict:
  """A torch module's state dict as numpy copies."""
  return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def _kwargs(hf_dict: dict) -> dict:
  return {k: v for k, v in hf_dict.items() if k not in ("architectures", "model_type")}


def add_authors_fpn(decoder, seed: int = 0) -> None:
  """A transformers Mask2FormerPixelDecoder turned, in place, into the authors' FPN (SegEarth-R1/R2
  msdeformattn.py): lateral Conv2d(bias) -> GroupNorm -> ReLU, output Conv2d(bias) -> GroupNorm -> ReLU.
  The biases are random (non-zero) so a dropped or misplaced one shows. Written here, independently of
  the exporter's version (convert/torch_model.py)."""
  gen = torch.Generator().manual_seed(seed)
  for k in range(1, decoder.num_fpn_levels + 1):
    for name in (f"adapter_{k}", f"layer_{k}"):
      seq = getattr(decoder, name)
      conv = seq[0]
      conv.bias = torch.nn.Parameter(0.5 * torch.randn(conv.out_channels, generator=gen))
    getattr(decoder, f"adapter_{k}").append(torch.nn.ReLU())   # the same object forward() runs


def hf_parts(model_cfg, seed: int = 0, fpn: str = "mask2former") -> dict:
  """Random transformers modules shaped by ``model_cfg``: siglip, projector, phi, mask2former. The Mask2Former
  norms are moved off their init values, so an identity-initialised tensor is checked like any other.
  ``fpn='authors'``: the pixel decoder gets the authors' FPN (``add_authors_fpn``)."""
  from transformers import (Mask2FormerConfig, Mask2FormerModel, PhiConfig, PhiForCausalLM, SiglipVisionConfig,
                            SiglipVisionModel, SwinConfig)

  m = ModelConfig.from_dict(model_cfg)
  torch.manual_seed(seed)
  v = m.vision
  siglip = SiglipVisionModel(SiglipVisionConfig(
      hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=v.num_hidden_layers,
      num_attention_heads=v.num_attention_heads, image_size=v.image_size, patch_size=v.patch_size))
  d = m.llm.hidden_size
  projector = torch.nn.Sequential(torch.nn.Linear(v.hidden_size, d), torch.nn.GELU(), torch.nn.Linear(d, d))
  phi = PhiForCausalLM(PhiConfig(**_kwargs(m.llm.to_hf_dict())))
  mc = mask2former_hf_config(m.swin, m.pixel_decoder, m.mask_decoder)
  backbone = SwinConfig(**_kwargs(mc.pop("backbone_config")))
  m2f = Mask2FormerModel(Mask2FormerConfig(backbone_config=backbone, **mc))
  with torch.no_grad():
    for name, p in m2f.named_parameters():
      if "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  if fpn == "authors":
    add_authors_fpn(m2f.pixel_level_module.decoder, seed)
  return dict(siglip=siglip, projector=projector, phi=phi, mask2former=m2f)


def mipha_state(parts: dict) -> dict:
  """The Mipha keys of the MLLM parts (model.vision_tower.vision_model.*, model.mm_projector.*, Phi's)."""
  out = {f"model.vision_tower.vision_model.{k}": x for k, x in state(parts["siglip"]).items()}
  out |= {f"model.mm_projector.{k}": x for k, x in state(parts["projector"]).items()}
  return out | state(parts["phi"])


def write_mipha(out_dir, parts: dict, model_cfg) -> str:
  """A Mipha folder of ``parts`` with a toy tokenizer ([SEG] and <image> added)."""
  out_dir = str(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  save_file(mipha_state(parts), os.path.join(out_dir, "model.safetensors"))
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(mipha_config_dict(model_cfg), f)
  train_toy_tokenizer([PHI_SYSTEM, EVAL_PROMPT, "a ship"], out_dir, vocab_size=400)
  return out_dir


# HF Mask2FormerTransformerModule key (relative) -> detectron2 predictor key, written from detectron2's module names
_DECODER_TO_D2 = [
    (r"decoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"transformer_self_attention_layers.\1.self_attn.out_proj."),
    (r"decoder\.layers\.(\d+)\.self_attn_layer_norm\.", r"transformer_self_attention_layers.\1.norm."),
    (r"decoder\.layers\.(\d+)\.cross_attn\.", r"transformer_cross_attention_layers.\1.multihead_attn."),
    (r"decoder\.layers\.(\d+)\.cross_attn_layer_norm\.", r"transformer_cross_attention_layers.\1.norm."),
    (r"decoder\.layers\.(\d+)\.fc1\.", r"transformer_ffn_layers.\1.linear1."),
    (r"decoder\.layers\.(\d+)\.fc2\.", r"transformer_ffn_layers.\1.linear2."),
    (r"decoder\.layers\.(\d+)\.final_layer_norm\.", r"transformer_ffn_layers.\1.norm."),
    (r"decoder\.layernorm\.", "decoder_norm."),
    (r"decoder\.mask_predictor\.mask_embedder\.(\d+)\.0\.", r"mask_embed.layers.\1."),
    (r"input_projections\.", "input_proj."),   # present when feature_size != hidden_dim
    (r"level_embed\.", "level_embed."),
    (r"queries_features\.", "query_feat."), (r"queries_embedder\.", "query_embed."),
]


def hf_decoder_to_d2(hf: dict) -> dict:
  """HF transformer-module tensors (keys relative to it) -> detectron2 ``sem_seg_head.predictor.`` names
  (relative), q/k/v fused back into the packed ``in_proj``."""
  out, qkv = {}, {}
  for k, v in hf.items():
    if m := re.fullmatch(r"decoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", k):
      qkv.setdefault(f"transformer_self_attention_layers.{m[1]}.self_attn.in_proj_{m[3]}", {})[m[2]] = v
      continue
    for pat, rep in _DECODER_TO_D2:
      renamed, n = re.subn("^" + pat, rep, k)
      if n:
        out[renamed] = v
        break
    else:
      raise AssertionError(f"fixture: unexpected transformer module key {k}")
  for k, parts in qkv.items():
    out[k] = np.concatenate([parts["q"], parts["k"], parts["v"]], 0)
  return out


def same_arrays(got: dict, want: dict) -> None:
  """Same keys, and every array equal in dtype and bits."""
  assert set(got) == set(want), (sorted(set(got) - set(want))[:5], sorted(set(want) - set(got))[:5])
  for k, w in want.items():
    g = np.asarray(got[k])
    assert g.dtype == np.asarray(w).dtype and np.array_equal(g, np.asarray(w)), k
