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

from segearth_jax.convert.name_map import CONV2D, LINEAR, ConversionError, Rule

HF_PREFIX = "model.transformer_module."
UNUSED = ("queries_features.weight", "queries_embedder.weight")


def _ln(ours: str, theirs: str) -> list[Rule]:
  return [Rule(f"{ours}/scale", f"{theirs}.weight"), Rule(f"{ours}/bias", f"{theirs}.bias")]


def _lin(ours: str, theirs: str) -> list[Rule]:
  return [Rule(f"{ours}/kernel", f"{theirs}.weight", LINEAR), Rule(f"{ours}/bias", f"{theirs}.bias")]


def mask_decoder_rules(prefix: str = HF_PREFIX, ours_prefix: str = "", *, input_projections: bool = False,
                       mask_embed_layers: int = 3) -> list[Rule]:
  """Rules for one MaskDecoder. ``input_projections``: the checkpoint has the 1x1 input convs
  (HF adds them when feature_size != hidden_dim or enforce_input_projection)."""
  o, t = ours_prefix, prefix
  layer, hl = f"{o}layers_{{i}}", f"{t}decoder.layers.{{i}}"
  rules = [Rule(f"{o}level_embed", f"{t}level_embed.weight")]
  if input_projections:
    rules += [Rule(f"{o}input_proj_{{l}}/kernel", f"{t}input_projections.{{l}}.weight", CONV2D),
              Rule(f"{o}input_proj_{{l}}/bias", f"{t}input_projections.{{l}}.bias")]
  rules += [
      Rule(f"{layer}/cross_attn/in_proj_kernel", f"{hl}.cross_attn.in_proj_weight", LINEAR),
      Rule(f"{layer}/cross_attn/in_proj_bias", f"{hl}.cross_attn.in_proj_bias"),
      *_lin(f"{layer}/cross_attn/out_proj", f"{hl}.cross_attn.out_proj"),
      *_ln(f"{layer}/cross_attn_layer_norm", f"{hl}.cross_attn_layer_norm"),
      *[r for p in ("q_proj", "k_proj", "v_proj", "out_proj")
        for r in _lin(f"{layer}/self_attn/{p}", f"{hl}.self_attn.{p}")],
      *_ln(f"{layer}/self_attn_layer_norm", f"{hl}.self_attn_layer_norm"),
      *_lin(f"{layer}/fc1", f"{hl}.fc1"),
      *_lin(f"{layer}/fc2", f"{hl}.fc2"),
      *_ln(f"{layer}/final_layer_norm", f"{hl}.final_layer_norm"),
      *_ln(f"{o}layernorm", f"{t}decoder.layernorm"),
  ]
  for j in range(mask_embed_layers):
    rules += _lin(f"{o}mask_predictor/mask_embedder_{j}", f"{t}decoder.mask_predictor.mask_embedder.{j}.0")
  return rules


def mask_decoder_ignore(prefix: str = HF_PREFIX) -> list[str]:
  """Regexes of HF keys that SegEarth-R2 does not use (learned queries and their position embedding)."""
  return [re.escape(prefix + k) for k in UNUSED]


def export_unused(prefix: str, num_queries: int, hidden_dim: int):
  """Zero tensors for the ignored keys, shaped as in the HF model, so a strict load finds them all."""
  for k in UNUSED:
    yield prefix + k, np.zeros((num_queries, hidden_dim), np.float32)


# ------------------------------------------------------------------------ detectron2 -> HF
D2_PREFIX = "sem_seg_head.predictor."


def d2_mask_decoder_to_hf(d2: Mapping[str, np.ndarray], prefix: str = HF_PREFIX) -> dict[str, np.ndarray]:
  """detectron2 ``MultiScaleMaskedTransformerDecoder`` tensors -> HF ``Mask2FormerTransformerModule`` keys.

  d2 self-attention is a packed ``nn.MultiheadAttention`` (in_proj_weight = [q; k; v]); HF splits it into
  q/k/v_proj. Keys outside ``sem_seg_head.predictor.`` are skipped. ``class_embed.*`` becomes HF's
  top-level ``class_predictor.*`` (the ForUniversalSegmentation head, which our import ignores).
  """
  out: dict[str, np.ndarray] = {}
  t = prefix
  for key, arr in d2.items():
    if not key.startswith(D2_PREFIX):
      continue
    k = key[len(D2_PREFIX):]
    arr = np.asarray(arr)
    m = re.fullmatch(r"transformer_self_attention_layers\.(\d+)\.(.+)", k)
    if m:
      i, rest = m.groups()
      hl = f"{t}decoder.layers.{i}."
      if rest in ("self_attn.in_proj_weight", "self_attn.in_proj_bias"):
        kind = rest.rsplit("_", 1)[1]
        for name, part in zip(("q_proj", "k_proj", "v_proj"), np.split(arr, 3, axis=0)):
          out[f"{hl}self_attn.{name}.{kind}"] = np.ascontiguousarray(part)
      elif rest.startswith("self_attn.out_proj."):
        out[hl + rest] = arr
      elif rest.startswith("norm."):
        out[hl + "self_attn_layer_norm." + rest[len("norm."):]] = arr
      else:
        raise ConversionError(f"detectron2 key {key!r}: unknown self-attention tensor")
      continue
    m = re.fullmatch(r"transformer_cross_attention_layers\.(\d+)\.(.+)", k)
    if m:
      i, rest = m.groups()
      hl = f"{t}decoder.layers.{i}."
      if rest.startswith("multihead_attn."):
        out[hl + "cross_attn." + rest[len("multihead_attn."):]] = arr
      elif rest.startswith("norm."):
        out[hl + "cross_attn_layer_norm." + rest[len("norm."):]] = arr
      else:
        raise ConversionError(f"detectron2 key {key!r}: unknown cross-attention tensor")
      continue
    m = re.fullmatch(r"transformer_ffn_layers\.(\d+)\.(linear1|linear2|norm)\.(weight|bias)", k)
    if m:
      i, mod, kind = m.groups()
      name = {"linear1": "fc1", "linear2": "fc2", "norm": "final_layer_norm"}[mod]
      out[f"{t}decoder.layers.{i}.{name}.{kind}"] = arr
      continue
    m = re.fullmatch(r"mask_embed\.layers\.(\d+)\.(weight|bias)", k)
    if m:
      out[f"{t}decoder.mask_predictor.mask_embedder.{m.group(1)}.0.{m.group(2)}"] = arr
      continue
    m = re.fullmatch(r"input_proj\.(\d+)\.(weight|bias)", k)
    if m:
      out[f"{t}input_projections.{m.group(1)}.{m.group(2)}"] = arr
      continue
    simple = {"decoder_norm.weight": "decoder.layernorm.weight", "decoder_norm.bias": "decoder.layernorm.bias",
              "level_embed.weight": "level_embed.weight", "query_feat.weight": "queries_features.weight",
              "query_embed.weight": "queries_embedder.weight"}
    if k in simple:
      out[t + simple[k]] = arr
    elif k.startswith("class_embed."):
      out["class_predictor." + k[len("class_embed."):]] = arr   # HF ForUniversalSegmentation's head
    else:
      raise ConversionError(f"detectron2 key {key!r}: not part of the Mask2Former transformer decoder")
  return out
