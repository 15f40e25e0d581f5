"""Name maps for the Swin backbone (both directions), from HF or detectron2 checkpoints; the Swin HF config.

HF has two key layouts for the same weights (transformers 5.x):
- 'saved' (legacy=True): what `save_pretrained` writes and what Hub checkpoints hold, e.g.
  `model.pixel_level_module.encoder.encoder.layers.0.blocks.0.attention.self.query.weight`,
  `...attention.output.dense`, `...intermediate.dense`, `...output.dense`; no `swin.` level.
- 'module' (legacy=False): the in-memory `state_dict()` names of `SwinBackbone`:
  `...encoder.swin.encoder.layers.0.blocks.0.attention.q_proj.weight`, `...attention.o_proj`,
  `...attention.relative_position_bias.relative_position_bias_table`, `...mlp.fc1`, `...mlp.fc2`.
`from_pretrained` reads both. Default prefix: the backbone inside `Mask2FormerForUniversalSegmentation`
(`model.` + `pixel_level_module.encoder.`; use `pixel_level_module.encoder.` for `Mask2FormerModel`,
'' for a standalone `SwinBackbone`). A standalone `SwinModel` has no stage-output norms
(`stage_norms=False`; `body=''` for its state_dict): `import_swin` then sets them to identity, as
HF initialises `hidden_states_norms` when a SwinBackbone loads a SwinModel checkpoint.

Not mapped (`swin_ignore`): `relative_position_index` buffers (recomputed from window_size) and the
SwinModel's final `layernorm` (the backbone never applies it).

detectron2 (original Mask2Former `.pkl`, read by tensor_io's restricted unpickler): `d2_swin_to_hf`
renames `backbone.*` to the HF 'saved' layout and splits the fused `attn.qkv` ([3C, C], rows q|k|v) into
query/key/value, so one name map serves both sources. Patch merging concatenates the 2x2 neighbours in
the same order (x0=(0,0), x1=(1,0), x2=(0,1), x3=(1,1)) in both, so `downsample.reduction` needs no
permutation.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Mapping

import numpy as np

from segearth_jax.convert.name_map import (CONV2D, IDENTITY, LINEAR, ConversionError, NameMap, Rule, layer_rules,
                                           linear, norm, path_prefix, plain_params, rename_keys, rules)
from segearth_jax.models.swin import SwinConfig
from segearth_jax.tensor_io import open_checkpoint, save_safetensors

M2F_PREFIX = "model.pixel_level_module.encoder."

# One block, blocks.{j}: (ours under stage{s}/blocks, theirs in the saved layout, theirs in the module layout).
_BLOCK_LINEARS = [("attention/query", "attention.self.query", "attention.q_proj"),
                  ("attention/key", "attention.self.key", "attention.k_proj"),
                  ("attention/value", "attention.self.value", "attention.v_proj"),
                  ("attention/proj", "attention.output.dense", "attention.o_proj"),
                  ("fc1", "intermediate.dense", "mlp.fc1"),
                  ("fc2", "output.dense", "mlp.fc2")]
_BLOCK_TABLE = ("attention/relative_position_bias_table", "attention.self.relative_position_bias_table",
                "attention.relative_position_bias.relative_position_bias_table")


def _block_params(legacy: bool):
  params = [*norm("layernorm_before", "layernorm_before"), *norm("layernorm_after", "layernorm_after")]
  for ours, saved, module in _BLOCK_LINEARS:
    params += linear(ours, saved if legacy else module)
  ours, saved, module = _BLOCK_TABLE
  return params + [(ours, saved if legacy else module, IDENTITY)]


def swin_rules(prefix: str = M2F_PREFIX, ours_prefix: str = "", *, legacy: bool = True,
               body: str | None = None, stage_norms: bool = True, scan_layers: bool = True) -> list[Rule]:
  """HF Swin backbone keys (under `prefix`) <-> our SwinBackbone params (under `ours_prefix`).

  `legacy`: the 'saved' layout (True) or the module `state_dict()` layout (False); `body`: the level
  between `prefix` and `embeddings.`/`encoder.` ('' for saved, 'swin.' for a SwinBackbone
  state_dict; default from `legacy`). `scan_layers=False` maps to unstacked `blocks_{j}` params.
  """
  o, t = path_prefix(ours_prefix), prefix
  b = t + (("" if legacy else "swin.") if body is None else body)
  out = [
      Rule(f"{o}patch_embed/kernel", f"{b}embeddings.patch_embeddings.projection.weight", CONV2D),
      Rule(f"{o}patch_embed/bias", f"{b}embeddings.patch_embeddings.projection.bias"),
      *rules(o, b, norm("patch_norm", "embeddings.norm")),
      *layer_rules(f"{o}stage{{s}}/blocks", f"{b}encoder.layers.{{s}}.blocks.{{j}}.", _block_params(legacy),
                   index="j", scan_layers=scan_layers),
      *rules(o, f"{b}encoder.layers.{{s}}.", norm("merge{s}/norm", "downsample.norm")),
      Rule(f"{o}merge{{s}}/reduction/kernel", f"{b}encoder.layers.{{s}}.downsample.reduction.weight", LINEAR),
  ]
  if stage_norms:  # HF names the outputs stage1..stageN; so do we (norm_stage{k})
    out += rules(o, t, norm("norm_stage{k}", "hidden_states_norms.stage{k}"))
  return out


def swin_ignore(prefix: str = M2F_PREFIX) -> list[str]:
  """Regexes (full match) of HF keys under `prefix` that carry nothing we use."""
  p = re.escape(prefix)
  return [rf"{p}.*relative_position_index",
          rf"{p}(swin\.)?layernorm\.(weight|bias)"]  # SwinModel's final norm: unused by the backbone


def swin_name_map(prefix: str = M2F_PREFIX, **kw) -> NameMap:
  return NameMap(swin_rules(prefix, **kw), ignore=swin_ignore(prefix))


# ---------------------------------------------------------------------------- layout detection
_ANCHOR = "embeddings.patch_embeddings.projection.weight"


def swin_layout(keys, prefix: str | None = None, where: str = "checkpoint") -> dict:
  """Finds `prefix`, `body`, `legacy` and `stage_norms` of the Swin backbone among `keys`."""
  keys = list(keys)
  hits = [k[:-len(_ANCHOR)] for k in keys if k.endswith(_ANCHOR)]
  if prefix is not None:
    hits = [h for h in hits if h.startswith(prefix)]
  if len(hits) != 1:
    raise ConversionError(f"{where}: cannot find a single Swin backbone (keys ending in {_ANCHOR!r}"
                          f"{'' if prefix is None else f' under {prefix!r}'}): found {hits}")
  full = hits[0]
  if prefix is None:
    prefix = full[:-len("swin.")] if full.endswith("swin.") else full
  body = full[len(prefix):]
  legacy = any(k.startswith(full) and ".attention.self.query." in k for k in keys)
  stage_norms = any(k.startswith(prefix + "hidden_states_norms.") for k in keys)
  return dict(prefix=prefix, body=body, legacy=legacy, stage_norms=stage_norms)


# ---------------------------------------------------------------------------- detectron2
D2_PREFIX = "backbone."
_D2_BLOCK = "layers.{s}.blocks.{j}."
_HF_BLOCK = "encoder.layers.{s}.blocks.{j}."
# detectron2 key (under backbone.) -> HF 'saved' key (under the HF prefix); see name_map.rename_keys
_D2_TO_HF = [
    ("patch_embed.proj.{p}", "embeddings.patch_embeddings.projection.{p}"),
    ("patch_embed.norm.{p}", "embeddings.norm.{p}"),
    (_D2_BLOCK + "attn.qkv.{p}", tuple(f"{_HF_BLOCK}attention.self.{n}.{{p}}" for n in ("query", "key", "value"))),
    (_D2_BLOCK + "attn.relative_position_index", None),  # recomputed from window_size
    (_D2_BLOCK + "attn.relative_position_bias_table", _HF_BLOCK + "attention.self.relative_position_bias_table"),
    (_D2_BLOCK + "attn.proj.{p}", _HF_BLOCK + "attention.output.dense.{p}"),
    (_D2_BLOCK + "norm1.{p}", _HF_BLOCK + "layernorm_before.{p}"),
    (_D2_BLOCK + "norm2.{p}", _HF_BLOCK + "layernorm_after.{p}"),
    (_D2_BLOCK + "mlp.fc1.{p}", _HF_BLOCK + "intermediate.dense.{p}"),
    (_D2_BLOCK + "mlp.fc2.{p}", _HF_BLOCK + "output.dense.{p}"),
    ("layers.{s}.downsample.reduction.weight", "encoder.layers.{s}.downsample.reduction.weight"),
    ("layers.{s}.downsample.norm.{p}", "encoder.layers.{s}.downsample.norm.{p}"),
    ("norm{k}.{p}", "hidden_states_norms.stage{k+1}.{p}"),
]


def d2_swin_to_hf(d2_state: Mapping[str, Any], prefix: str = M2F_PREFIX, *,
                  d2_prefix: str = D2_PREFIX) -> dict[str, np.ndarray]:
  """detectron2 Swin weights (`backbone.*`; other keys are skipped) -> HF 'saved'-layout numpy
  tensors under `prefix`. Fused `attn.qkv` is split into query/key/value; `relative_position_index`
  buffers are dropped; `backbone.norm{i}` becomes `hidden_states_norms.stage{i+1}`."""
  return rename_keys(d2_state, _D2_TO_HF, src_prefix=d2_prefix, dst_prefix=prefix,
                     what="detectron2 checkpoint (Swin)", hint=" (absolute position embeddings are not supported)")


# ---------------------------------------------------------------------------- whole-backbone helpers
def _identity_norms(params: dict, dims) -> None:
  for k, c in enumerate(dims, start=1):
    params.setdefault(f"norm_stage{k}", {"scale": np.ones((c,), np.float32),
                                         "bias": np.zeros((c,), np.float32)})


def import_swin(src, *, prefix: str | None = None, scan_layers: bool = True, dtype=None) -> dict:
  """HF Swin weights or a detectron2 `.pkl` (any tensor_io.open_checkpoint source) -> our SwinBackbone
  params. The layout (prefix, saved/module names, stage norms) is found from the keys; only keys under
  the prefix are read, one tensor at a time."""
  ckpt = open_checkpoint(src)
  keys, get = ckpt.keys, ckpt.get
  if ckpt.format == "detectron2":
    hf = d2_swin_to_hf(ckpt.as_dict())
    keys, get = list(hf), hf.__getitem__
  lay = swin_layout(keys, prefix, ckpt.where)
  keys = [k for k in keys if k.startswith(lay["prefix"])]
  names = swin_name_map(lay["prefix"], legacy=lay["legacy"], body=lay["body"], stage_norms=lay["stage_norms"],
                        scan_layers=scan_layers)
  params = names.to_ours(keys, get, dtype=dtype, where=ckpt.where)
  if not lay["stage_norms"]:
    c, n = params["patch_norm"]["scale"].shape[0], 1 + sum(k.startswith("merge") for k in params)
    _identity_norms(params, [c * 2 ** i for i in range(n)])
  return params


def export_swin(params: Mapping[str, Any], prefix: str = M2F_PREFIX, *, legacy: bool = True,
                scan_layers: bool = True) -> dict[str, np.ndarray]:
  """Our SwinBackbone params -> HF-named numpy tensors (default: the 'saved' layout inside a
  Mask2Former checkpoint)."""
  return dict(swin_name_map(prefix, legacy=legacy, scan_layers=scan_layers).to_theirs(plain_params(params)))


def swin_hf_config(config: SwinConfig) -> dict:
  """Our SwinConfig -> a transformers SwinConfig dict for a SwinBackbone with stage1..stageN out."""
  d = dataclasses.asdict(config)
  n = len(config.depths)
  d.update(depths=list(config.depths), num_heads=list(config.num_heads), model_type="swin",
           architectures=["SwinBackbone"], use_absolute_embeddings=False, qkv_bias=True,
           drop_path_rate=0.0, out_features=[f"stage{k}" for k in range(1, n + 1)],
           stage_names=["stem"] + [f"stage{k}" for k in range(1, n + 1)])
  return d


def save_swin_backbone(params: Mapping[str, Any], out_dir: str, config: SwinConfig, *,
                       scan_layers: bool = True) -> list[str]:
  """Our params -> a folder `transformers.SwinBackbone.from_pretrained` loads (saved layout)."""
  files = save_safetensors(export_swin(params, "", scan_layers=scan_layers).items(), out_dir)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(swin_hf_config(config), f, indent=2, sort_keys=True)
  return files
