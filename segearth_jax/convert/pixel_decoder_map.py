"""Name maps for the Mask2Former pixel decoder: transformers <-> ours, and detectron2 -> transformers.

Level order: transformers (``input_projections.{l}``, ``level_embed[l]``) and detectron2
(``input_proj.{l}``, ``transformer.level_embed[l]``) both index levels low resolution first
(l=0: stride 32 / res5, l=2: stride 8 / res3), and ours keeps that order (``input_proj_{l}``), so no
level is permuted anywhere. The FPN convs are ``adapter_{k}`` / ``layer_{k}`` in all three, k=1 for the
stride-4 map. detectron2's ``Conv2d(norm=...)`` keeps its GroupNorm as ``.norm``; HF's Sequential uses
``.1``.

FPN variant (``PixelDecoderConfig.fpn``): with 'authors' the two FPN convs have biases, HF-named
``adapter_{k}.0.bias`` / ``layer_{k}.0.bias`` (the authors' Sequential names, which the PyTorch export
keeps); 'mask2former' has none (transformers, detectron2). ``with_fpn_biases`` gives a pixel decoder
imported from a bias-free checkpoint the biases the 'authors' variant needs (zeros, as the authors start).
"""
from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from segearth_jax.convert.name_map import CONV2D, Rule, layer_rules, linear, norm, rename_keys, rules

HF_PREFIX = "model.pixel_level_module.decoder."
D2_PREFIX = "sem_seg_head.pixel_decoder."

_ATTN = ("sampling_offsets", "attention_weights", "value_proj", "output_proj")
# one encoder layer, encoder.layers.{i} (always nn.scan-stacked): (ours under encoder, theirs, transform)
_LAYER = [*[p for n in _ATTN for p in linear(f"self_attn/{n}", f"self_attn.{n}")],
          *linear("fc1", "fc1"), *linear("fc2", "fc2"),
          *norm("self_attn_layer_norm", "self_attn_layer_norm"), *norm("final_layer_norm", "final_layer_norm")]


def pixel_decoder_rules(prefix: str = HF_PREFIX, ours_prefix: str = "", *, fpn: str = "mask2former") -> list[Rule]:
  """Rules for ``PixelDecoder`` params under ``ours_prefix`` (e.g. 'pixel_decoder/') and the HF keys under
  ``prefix`` ('pixel_level_module.decoder.' for a bare ``Mask2FormerModel``); ``fpn``: the FPN variant
  ('authors' adds the FPN conv biases)."""
  o, t = ours_prefix, prefix
  out = [
      Rule(f"{o}level_embed", f"{t}level_embed"),
      Rule(f"{o}input_proj_{{l}}/conv/kernel", f"{t}input_projections.{{l}}.0.weight", CONV2D),
      Rule(f"{o}input_proj_{{l}}/conv/bias", f"{t}input_projections.{{l}}.0.bias"),
      *rules(o, t, norm("input_proj_{l}/norm", "input_projections.{l}.1")),
      *layer_rules(f"{o}encoder", f"{t}encoder.layers.{{i}}.", _LAYER),
  ]
  for name in ("adapter", "layer"):   # FPN lateral (1x1) and output (3x3) convs
    out += [Rule(f"{o}{name}_{{k}}/conv/kernel", f"{t}{name}_{{k}}.0.weight", CONV2D),
            *rules(o, t, norm(f"{name}_{{k}}/norm", f"{name}_{{k}}.1"))]
    if fpn == "authors":
      out.append(Rule(f"{o}{name}_{{k}}/conv/bias", f"{t}{name}_{{k}}.0.bias"))
  out += [Rule(f"{o}mask_projection/kernel", f"{t}mask_projection.weight", CONV2D),
          Rule(f"{o}mask_projection/bias", f"{t}mask_projection.bias")]
  return out


def fpn_conv_names(pixel_decoder_params: Mapping) -> list[str]:
  """The FPN conv modules of our pixel decoder params: 'adapter_{k}' and 'layer_{k}'."""
  return sorted(k for k in pixel_decoder_params if re.fullmatch(r"(adapter|layer)_\d+", k))


def with_fpn_biases(pixel_decoder_params: Mapping, fpn: str, biases: Mapping | None = None) -> dict:
  """Our pixel decoder params shaped for the FPN variant ``fpn``: for 'authors', every FPN conv gets
  'conv/bias' (``biases[name]`` when given, e.g. the authors' trained ones, else zeros: the authors' init
  from the bias-free detectron2 weights); 'mask2former' params are returned as they are."""
  out = dict(pixel_decoder_params)
  if fpn != "authors":
    return out
  biases = biases or {}
  for name in fpn_conv_names(out):
    conv = dict(out[name]["conv"])
    width = np.shape(conv["kernel"])[-1]
    conv["bias"] = biases[name] if name in biases else np.zeros((width,), np.asarray(conv["kernel"]).dtype)
    out[name] = dict(out[name], conv=conv)
  return out


def pixel_decoder_ignore(prefix: str = HF_PREFIX) -> list[str]:
  """HF keys under the pixel decoder that carry nothing (regexes). The position embedding and reference
  points are computed, not stored, so there are none today; kept so callers compose it uniformly."""
  del prefix
  return []


# ------------------------------------------------------------------------------------ detectron2
# (d2 template, HF template) relative to the two prefixes (name_map.rename_keys; {p}: weight|bias).
_D2_TO_HF = [
    ("input_proj.{l}.0.{p}", "input_projections.{l}.0.{p}"),
    ("input_proj.{l}.1.{p}", "input_projections.{l}.1.{p}"),
    ("transformer.level_embed", "level_embed"),
    *[(f"transformer.encoder.layers.{{i}}.self_attn.{n}.{{p}}", f"encoder.layers.{{i}}.self_attn.{n}.{{p}}")
      for n in _ATTN],
    ("transformer.encoder.layers.{i}.norm1.{p}", "encoder.layers.{i}.self_attn_layer_norm.{p}"),
    ("transformer.encoder.layers.{i}.linear1.{p}", "encoder.layers.{i}.fc1.{p}"),
    ("transformer.encoder.layers.{i}.linear2.{p}", "encoder.layers.{i}.fc2.{p}"),
    ("transformer.encoder.layers.{i}.norm2.{p}", "encoder.layers.{i}.final_layer_norm.{p}"),
    ("adapter_{k}.weight", "adapter_{k}.0.weight"),
    ("adapter_{k}.norm.{p}", "adapter_{k}.1.{p}"),
    ("layer_{k}.weight", "layer_{k}.0.weight"),
    ("layer_{k}.norm.{p}", "layer_{k}.1.{p}"),
    ("mask_features.{p}", "mask_projection.{p}"),
]


def d2_pixel_decoder_to_hf(d2_state: Mapping, d2_prefix: str = D2_PREFIX, hf_prefix: str = HF_PREFIX) -> dict:
  """detectron2 Mask2Former state (the ``.pkl``'s ``model`` dict, or the whole pickle) -> HF-named
  pixel decoder tensors. Keys outside ``d2_prefix`` are skipped (the backbone/decoder maps take them)."""
  if "model" in d2_state and isinstance(d2_state["model"], Mapping):
    d2_state = d2_state["model"]
  return rename_keys(d2_state, _D2_TO_HF, src_prefix=d2_prefix, dst_prefix=hf_prefix,
                     what="detectron2 checkpoint (pixel decoder)", hint=" (unknown pixel decoder parameter)")


def hf_pixel_decoder_to_d2(hf_state: Mapping, hf_prefix: str = HF_PREFIX, d2_prefix: str = D2_PREFIX) -> dict:
  """The inverse of ``d2_pixel_decoder_to_hf`` (makes detectron2-named files, e.g. test fixtures)."""
  return rename_keys(hf_state, [(b, a) for a, b in _D2_TO_HF], src_prefix=hf_prefix, dst_prefix=d2_prefix,
                     what="transformers checkpoint (pixel decoder)")
