"""Name maps for the Mask2Former pixel decoder: transformers <-> ours, and detectron2 -> transformers.

Level order: transformers (``input_projections.{l}``, ``level_embed[l]``) and detectron2
(``input_proj.{l}``, ``transformer.level_embed[l]``) both index levels low resolution first
(l=0: stride 32 / res5, l=2: stride 8 / res3), and ours keeps that order (``input_proj_{l}``), so no
level is permuted anywhere. The FPN convs are ``adapter_{k}`` / ``layer_{k}`` in all three, k=1 for the
stride-4 map. detectron2's ``Conv2d(norm=...)`` keeps its GroupNorm as ``.norm``; HF's Sequential uses
``.1``.
"""
from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from segearth_jax.convert.name_map import CONV2D, IDENTITY, LINEAR, Rule
from segearth_jax.errors import UserError

HF_PREFIX = "model.pixel_level_module.decoder."
D2_PREFIX = "sem_seg_head.pixel_decoder."

_ATTN = ("sampling_offsets", "attention_weights", "value_proj", "output_proj")
# ours (relative to the encoder layer) -> HF (relative to encoder.layers.{i})
_LAYER_DENSE = {f"self_attn/{n}": f"self_attn.{n}" for n in _ATTN} | {"fc1": "fc1", "fc2": "fc2"}
_LAYER_NORMS = {"self_attn_layer_norm": "self_attn_layer_norm", "final_layer_norm": "final_layer_norm"}


def pixel_decoder_rules(prefix: str = HF_PREFIX, ours_prefix: str = "") -> list[Rule]:
  """Rules for ``PixelDecoder`` params under ``ours_prefix`` (e.g. 'pixel_decoder/') and the HF keys under
  ``prefix`` ('pixel_level_module.decoder.' for a bare ``Mask2FormerModel``)."""
  o, t = ours_prefix, prefix
  rules = [
      Rule(f"{o}level_embed", f"{t}level_embed"),
      Rule(f"{o}input_proj_{{l}}/conv/kernel", f"{t}input_projections.{{l}}.0.weight", CONV2D),
      Rule(f"{o}input_proj_{{l}}/conv/bias", f"{t}input_projections.{{l}}.0.bias"),
      Rule(f"{o}input_proj_{{l}}/norm/scale", f"{t}input_projections.{{l}}.1.weight"),
      Rule(f"{o}input_proj_{{l}}/norm/bias", f"{t}input_projections.{{l}}.1.bias"),
  ]
  for ours, theirs in _LAYER_DENSE.items():
    rules += [Rule(f"{o}encoder/{ours}/kernel", f"{t}encoder.layers.{{i}}.{theirs}.weight", LINEAR, stack="i"),
              Rule(f"{o}encoder/{ours}/bias", f"{t}encoder.layers.{{i}}.{theirs}.bias", IDENTITY, stack="i")]
  for ours, theirs in _LAYER_NORMS.items():
    rules += [Rule(f"{o}encoder/{ours}/scale", f"{t}encoder.layers.{{i}}.{theirs}.weight", IDENTITY, stack="i"),
              Rule(f"{o}encoder/{ours}/bias", f"{t}encoder.layers.{{i}}.{theirs}.bias", IDENTITY, stack="i")]
  for name in ("adapter", "layer"):   # FPN lateral (1x1) and output (3x3) convs, no conv bias
    rules += [Rule(f"{o}{name}_{{k}}/conv/kernel", f"{t}{name}_{{k}}.0.weight", CONV2D),
              Rule(f"{o}{name}_{{k}}/norm/scale", f"{t}{name}_{{k}}.1.weight"),
              Rule(f"{o}{name}_{{k}}/norm/bias", f"{t}{name}_{{k}}.1.bias")]
  rules += [Rule(f"{o}mask_projection/kernel", f"{t}mask_projection.weight", CONV2D),
            Rule(f"{o}mask_projection/bias", f"{t}mask_projection.bias")]
  return rules


def pixel_decoder_ignore(prefix: str = HF_PREFIX) -> list[str]:
  """HF keys under the pixel decoder that carry nothing (regexes). The position embedding and reference
  points are computed, not stored, so there are none today; kept so callers compose it uniformly."""
  del prefix
  return []


# ------------------------------------------------------------------------------------ detectron2
# (d2 template, HF template) relative to the two prefixes; {n} placeholders match integers.
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


def _compile(template: str) -> re.Pattern:
  out, pos = [], 0
  for m in re.finditer(r"\{(\w+)\}", template):
    out.append(re.escape(template[pos:m.start()]))
    out.append(f"(?P<{m.group(1)}>\\d+)" if m.group(1) != "p" else "(?P<p>weight|bias)")
    pos = m.end()
  out.append(re.escape(template[pos:]))
  return re.compile("^" + "".join(out) + "$")


def _rename(state: Mapping, src_prefix: str, dst_prefix: str, pairs, what: str) -> dict:
  compiled = [(_compile(a), b) for a, b in pairs]
  out = {}
  for key, value in state.items():
    if not key.startswith(src_prefix):
      continue
    rel = key[len(src_prefix):]
    for rx, template in compiled:
      m = rx.match(rel)
      if m:
        out[dst_prefix + template.format(**m.groupdict())] = np.asarray(value)
        break
    else:
      raise UserError(f"{what}: tensor {key!r} has no mapping (unknown pixel decoder parameter)")
  if not out:
    raise UserError(f"{what}: no tensors under {src_prefix!r}")
  return out


def d2_pixel_decoder_to_hf(d2_state: Mapping, d2_prefix: str = D2_PREFIX, hf_prefix: str = HF_PREFIX) -> dict:
  """detectron2 Mask2Former state (the ``.pkl``'s ``model`` dict, or the whole pickle) -> HF-named
  pixel decoder tensors. Keys outside ``d2_prefix`` are skipped (the backbone/decoder maps take them)."""
  if "model" in d2_state and isinstance(d2_state["model"], Mapping):
    d2_state = d2_state["model"]
  return _rename(d2_state, d2_prefix, hf_prefix, _D2_TO_HF, "detectron2 checkpoint")


def hf_pixel_decoder_to_d2(hf_state: Mapping, hf_prefix: str = HF_PREFIX, d2_prefix: str = D2_PREFIX) -> dict:
  """The inverse of ``d2_pixel_decoder_to_hf`` (makes detectron2-named files, e.g. test fixtures)."""
  return _rename(hf_state, hf_prefix, d2_prefix, [(b, a) for a, b in _D2_TO_HF], "transformers checkpoint")
