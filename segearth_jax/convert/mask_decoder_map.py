"""Name map: transformers ``Mask2FormerTransformerModule`` <-> our ``MaskDecoder`` params.

HF keys (under ``prefix``, default ``model.transformer_module.``):
  level_embed.weight, input_projections.{l}.{weight,bias} (only when present),
  decoder.layers.{i}.{cross_attn.in_proj_*, cross_attn.out_proj.*, self_attn.{q,k,v,out}_proj.*, fc1, fc2,
  {cross_attn,self_attn,final}_layer_norm.*}, decoder.layernorm.*, decoder.mask_predictor.mask_embedder.{j}.0.*
Unused by SegEarth-R2 (queries come from [SEG] tokens with zero position): ``queries_features.weight`` and
``queries_embedder.weight`` are ignored on import; on export ``export_unused`` writes them as zeros with
the checkpoint's shapes so ``from_pretrained`` finds every key.

Also here: ``d2_mask_decoder_to_hf``, the detectron2 ``sem_seg_head.predictor.*`` -> HF key rename.
"""
from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from segearth_jax.convert.name_map import (CONV2D, IDENTITY, LINEAR, Rule, layer_rules, linear, norm, rename_keys,
                                           rules)

HF_PREFIX = "model.transformer_module."
UNUSED = ("queries_features.weight", "queries_embedder.weight")

# one decoder layer, decoder.layers.{i}: (ours under layers_{i}, theirs, transform)
_LAYER = [("cross_attn/in_proj_kernel", "cross_attn.in_proj_weight", LINEAR),
          ("cross_attn/in_proj_bias", "cross_attn.in_proj_bias", IDENTITY),
          *linear("cross_attn/out_proj", "cross_attn.out_proj"),
          *norm("cross_attn_layer_norm", "cross_attn_layer_norm"),
          *[p for n in ("q_proj", "k_proj", "v_proj", "out_proj")
            for p in linear(f"self_attn/{n}", f"self_attn.{n}")],
          *norm("self_attn_layer_norm", "self_attn_layer_norm"),
          *linear("fc1", "fc1"), *linear("fc2", "fc2"),
          *norm("final_layer_norm", "final_layer_norm")]


def mask_decoder_rules(prefix: str = HF_PREFIX, ours_prefix: str = "", *, input_projections: bool = False,
                       mask_embed_layers: int = 3) -> list[Rule]:
  """Rules for one MaskDecoder. ``input_projections``: the checkpoint has the 1x1 input convs
  (HF adds them when feature_size != hidden_dim or enforce_input_projection). Its layers are a Python
  loop (``layers_{i}``), whatever ``model.scan_layers`` says."""
  o, t = ours_prefix, prefix
  out = [Rule(f"{o}level_embed", f"{t}level_embed.weight")]
  if input_projections:
    out += [Rule(f"{o}input_proj_{{l}}/kernel", f"{t}input_projections.{{l}}.weight", CONV2D),
            Rule(f"{o}input_proj_{{l}}/bias", f"{t}input_projections.{{l}}.bias")]
  out += layer_rules(f"{o}layers", f"{t}decoder.layers.{{i}}.", _LAYER, scan_layers=False)
  out += rules(o, t, norm("layernorm", "decoder.layernorm"))
  for j in range(mask_embed_layers):
    out += rules(o, t, linear(f"mask_predictor/mask_embedder_{j}", f"decoder.mask_predictor.mask_embedder.{j}.0"))
  return out


def mask_decoder_ignore(prefix: str = HF_PREFIX) -> list[str]:
  """Regexes of HF keys that SegEarth-R2 does not use (learned queries and their position embedding)."""
  return [re.escape(prefix + k) for k in UNUSED]


def export_unused(prefix: str, num_queries: int, hidden_dim: int):
  """Zero tensors for the ignored keys, shaped as in the HF model, so a strict load finds them all."""
  for k in UNUSED:
    yield prefix + k, np.zeros((num_queries, hidden_dim), np.float32)


# ------------------------------------------------------------------------ detectron2 -> HF
D2_PREFIX = "sem_seg_head.predictor."
_SELF, _CROSS, _FFN = ("transformer_self_attention_layers.{i}.", "transformer_cross_attention_layers.{i}.",
                       "transformer_ffn_layers.{i}.")
_HF = "decoder.layers.{i}."
# detectron2 MultiScaleMaskedTransformerDecoder key -> HF Mask2FormerTransformerModule key (name_map.rename_keys).
# d2 self-attention is a packed nn.MultiheadAttention (in_proj = [q; k; v]); HF splits it into q/k/v_proj.
_D2_TO_HF = [
    (_SELF + "self_attn.in_proj_{p}", tuple(f"{_HF}self_attn.{n}_proj.{{p}}" for n in "qkv")),
    (_SELF + "self_attn.out_proj.{p}", _HF + "self_attn.out_proj.{p}"),
    (_SELF + "norm.{p}", _HF + "self_attn_layer_norm.{p}"),
    (_CROSS + "multihead_attn.in_proj_{p}", _HF + "cross_attn.in_proj_{p}"),
    (_CROSS + "multihead_attn.out_proj.{p}", _HF + "cross_attn.out_proj.{p}"),
    (_CROSS + "norm.{p}", _HF + "cross_attn_layer_norm.{p}"),
    (_FFN + "linear1.{p}", _HF + "fc1.{p}"),
    (_FFN + "linear2.{p}", _HF + "fc2.{p}"),
    (_FFN + "norm.{p}", _HF + "final_layer_norm.{p}"),
    ("mask_embed.layers.{j}.{p}", "decoder.mask_predictor.mask_embedder.{j}.0.{p}"),
    ("input_proj.{l}.{p}", "input_projections.{l}.{p}"),
    ("decoder_norm.{p}", "decoder.layernorm.{p}"),
    ("level_embed.weight", "level_embed.weight"),
    ("query_feat.weight", "queries_features.weight"),
    ("query_embed.weight", "queries_embedder.weight"),
    ("class_embed.{p}", None),   # the class head: SegEarth-R2 has none
]


def d2_mask_decoder_to_hf(d2: Mapping[str, np.ndarray], prefix: str = HF_PREFIX) -> dict[str, np.ndarray]:
  """detectron2 ``sem_seg_head.predictor.*`` tensors -> HF ``Mask2FormerTransformerModule`` keys under
  ``prefix`` (keys outside it are skipped; the class head is dropped)."""
  return rename_keys(d2, _D2_TO_HF, src_prefix=D2_PREFIX, dst_prefix=prefix,
                     what="detectron2 checkpoint (transformer decoder)")
