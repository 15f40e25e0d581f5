"""Name maps for the Swin backbone (both directions), from HF or detectron2 checkpoints.

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

detectron2 (original Mask2Former `.pkl`): `d2_swin_to_hf` renames `backbone.*` to the HF 'saved'
layout and splits the fused `attn.qkv` ([3C, C], rows q|k|v) into query/key/value, so one name map
serves both sources. Patch merging concatenates the 2x2 neighbours in the same order (x0=(0,0),
x1=(1,0), x2=(0,1), x3=(1,1)) in both, so `downsample.reduction` needs no permutation.
"""
from __future__ import annotations

import os
import pickle
import re
from typing import Any, Mapping

import numpy as np

from segearth_jax.convert.name_map import CONV2D, IDENTITY, LINEAR, NameMap, Rule, SafetensorsReader
from segearth_jax.errors import UserError

M2F_PREFIX = "model.pixel_level_module.encoder."

# (ours under stage{s}/blocks, theirs-legacy, theirs-module, transform) for blocks.{j}.
_BLOCK = [
    ("layernorm_before/scale", "layernorm_before.weight", "layernorm_before.weight", IDENTITY),
    ("layernorm_before/bias", "layernorm_before.bias", "layernorm_before.bias", IDENTITY),
    ("attention/query/kernel", "attention.self.query.weight", "attention.q_proj.weight", LINEAR),
    ("attention/query/bias", "attention.self.query.bias", "attention.q_proj.bias", IDENTITY),
    ("attention/key/kernel", "attention.self.key.weight", "attention.k_proj.weight", LINEAR),
    ("attention/key/bias", "attention.self.key.bias", "attention.k_proj.bias", IDENTITY),
    ("attention/value/kernel", "attention.self.value.weight", "attention.v_proj.weight", LINEAR),
    ("attention/value/bias", "attention.self.value.bias", "attention.v_proj.bias", IDENTITY),
    ("attention/relative_position_bias_table", "attention.self.relative_position_bias_table",
     "attention.relative_position_bias.relative_position_bias_table", IDENTITY),
    ("attention/proj/kernel", "attention.output.dense.weight", "attention.o_proj.weight", LINEAR),
    ("attention/proj/bias", "attention.output.dense.bias", "attention.o_proj.bias", IDENTITY),
    ("layernorm_after/scale", "layernorm_after.weight", "layernorm_after.weight", IDENTITY),
    ("layernorm_after/bias", "layernorm_after.bias", "layernorm_after.bias", IDENTITY),
    ("fc1/kernel", "intermediate.dense.weight", "mlp.fc1.weight", LINEAR),
    ("fc1/bias", "intermediate.dense.bias", "mlp.fc1.bias", IDENTITY),
    ("fc2/kernel", "output.dense.weight", "mlp.fc2.weight", LINEAR),
    ("fc2/bias", "output.dense.bias", "mlp.fc2.bias", IDENTITY),
]


def _slash(prefix: str) -> str:
  return prefix if not prefix or prefix.endswith("/") else prefix + "/"


def swin_rules(prefix: str = M2F_PREFIX, ours_prefix: str = "", *, legacy: bool = True,
               body: str | None = None, stage_norms: bool = True, scan_layers: bool = True) -> list[Rule]:
  """HF Swin backbone keys (under `prefix`) <-> our SwinBackbone params (under `ours_prefix`).

  `legacy`: the 'saved' layout (True) or the module `state_dict()` layout (False); `body`: the level
  between `prefix` and `embeddings.`/`encoder.` ('' for saved, 'swin.' for a SwinBackbone
  state_dict; default from `legacy`). `scan_layers=False` maps to unstacked `blocks_{j}` params.
  """
  o, t = _slash(ours_prefix), prefix
  b = t + (("" if legacy else "swin.") if body is None else body)
  rules = [
      Rule(f"{o}patch_embed/kernel", f"{b}embeddings.patch_embeddings.projection.weight", CONV2D),
      Rule(f"{o}patch_embed/bias", f"{b}embeddings.patch_embeddings.projection.bias"),
      Rule(f"{o}patch_norm/scale", f"{b}embeddings.norm.weight"),
      Rule(f"{o}patch_norm/bias", f"{b}embeddings.norm.bias"),
  ]
  for ours, old, new, tf in _BLOCK:
    theirs = f"{b}encoder.layers.{{s}}.blocks.{{j}}.{old if legacy else new}"
    if scan_layers:
      rules.append(Rule(f"{o}stage{{s}}/blocks/{ours}", theirs, tf, stack="j"))
    else:
      rules.append(Rule(f"{o}stage{{s}}/blocks_{{j}}/{ours}", theirs, tf))
  rules += [
      Rule(f"{o}merge{{s}}/norm/scale", f"{b}encoder.layers.{{s}}.downsample.norm.weight"),
      Rule(f"{o}merge{{s}}/norm/bias", f"{b}encoder.layers.{{s}}.downsample.norm.bias"),
      Rule(f"{o}merge{{s}}/reduction/kernel", f"{b}encoder.layers.{{s}}.downsample.reduction.weight",
           LINEAR),
  ]
  if stage_norms:  # HF names the outputs stage1..stageN; so do we (norm_stage{k})
    rules += [
        Rule(f"{o}norm_stage{{k}}/scale", f"{t}hidden_states_norms.stage{{k}}.weight"),
        Rule(f"{o}norm_stage{{k}}/bias", f"{t}hidden_states_norms.stage{{k}}.bias"),
    ]
  return rules


def swin_ignore(prefix: str = M2F_PREFIX) -> list[str]:
  """Regexes (full match) of HF keys under `prefix` that carry nothing we use."""
  p = re.escape(prefix)
  return [rf"{p}.*relative_position_index",
          rf"{p}(swin\.)?layernorm\.(weight|bias)"]  # SwinModel's final norm: unused by the backbone


def swin_name_map(prefix: str = M2F_PREFIX, **kw) -> NameMap:
  return NameMap(swin_rules(prefix, **kw), ignore=swin_ignore(prefix))


# ---------------------------------------------------------------------------- layout detection
_ANCHOR = "embeddings.patch_embeddings.projection.weight"


def swin_layout(keys, prefix: str | None = None) -> dict:
  """Finds `prefix`, `body`, `legacy` and `stage_norms` of the Swin backbone among `keys`."""
  keys = list(keys)
  hits = [k[:-len(_ANCHOR)] for k in keys if k.endswith(_ANCHOR)]
  if prefix is not None:
    hits = [h for h in hits if h.startswith(prefix)]
  if len(hits) != 1:
    raise UserError(f"cannot find a single Swin backbone (keys ending in {_ANCHOR!r}"
                    f"{'' if prefix is None else f' under {prefix!r}'}): found {hits}")
  full = hits[0]
  if prefix is None:
    prefix = full[:-len("swin.")] if full.endswith("swin.") else full
  body = full[len(prefix):]
  legacy = any(k.startswith(full) and ".attention.self.query." in k for k in keys)
  stage_norms = any(k.startswith(prefix + "hidden_states_norms.") for k in keys)
  return dict(prefix=prefix, body=body, legacy=legacy, stage_norms=stage_norms)


# ---------------------------------------------------------------------------- detectron2
_D2_BLOCK = {
    "norm1": "layernorm_before", "norm2": "layernorm_after",
    "attn.relative_position_bias_table": "attention.self.relative_position_bias_table",
    "attn.proj": "attention.output.dense",
    "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense",
}


def _to_numpy(t) -> np.ndarray:
  if isinstance(t, np.ndarray):
    return t
  if type(t).__module__.startswith("torch"):
    return t.detach().cpu().numpy()
  return np.asarray(t)


def load_d2_pickle(path: str) -> dict:
  """A detectron2 checkpoint `.pkl` ({'model': {name: array}, ...}) -> its `model` dict."""
  try:
    with open(path, "rb") as f:
      obj = pickle.load(f, encoding="latin1")
  except (OSError, pickle.UnpicklingError, EOFError) as e:
    raise UserError(f"{path}: cannot read the detectron2 pickle: {e}") from e
  if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
    obj = obj["model"]
  if not isinstance(obj, Mapping):
    raise UserError(f"{path}: expected a dict of arrays (or {{'model': ...}}), got {type(obj).__name__}")
  return dict(obj)


def d2_swin_to_hf(d2_state: Mapping[str, Any], prefix: str = M2F_PREFIX, *,
                  d2_prefix: str = "backbone.") -> dict[str, np.ndarray]:
  """detectron2 Swin weights (`backbone.*`; other keys are skipped) -> HF 'saved'-layout numpy
  tensors under `prefix`. Fused `attn.qkv` is split into query/key/value; `relative_position_index`
  buffers are dropped; `backbone.norm{i}` becomes `hidden_states_norms.stage{i+1}`."""
  if "model" in d2_state and isinstance(d2_state["model"], Mapping):
    d2_state = d2_state["model"]
  out: dict[str, np.ndarray] = {}
  e = f"{prefix}encoder.layers."
  for key, val in d2_state.items():
    if not key.startswith(d2_prefix):
      continue
    k = key[len(d2_prefix):]
    arr = _to_numpy(val)
    if m := re.fullmatch(r"patch_embed\.proj\.(weight|bias)", k):
      out[f"{prefix}embeddings.patch_embeddings.projection.{m[1]}"] = arr
    elif m := re.fullmatch(r"patch_embed\.norm\.(weight|bias)", k):
      out[f"{prefix}embeddings.norm.{m[1]}"] = arr
    elif m := re.fullmatch(r"layers\.(\d+)\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)", k):
      if arr.shape[0] % 3:
        raise UserError(f"{key}: fused qkv has {arr.shape[0]} rows, not a multiple of 3")
      for name, part in zip(("query", "key", "value"), np.split(arr, 3, axis=0)):
        out[f"{e}{m[1]}.blocks.{m[2]}.attention.self.{name}.{m[3]}"] = np.ascontiguousarray(part)
    elif re.fullmatch(r"layers\.\d+\.blocks\.\d+\.attn\.relative_position_index", k):
      continue  # recomputed from window_size
    elif m := re.fullmatch(r"layers\.(\d+)\.blocks\.(\d+)\.(norm1|norm2|attn\.proj|mlp\.fc1|mlp\.fc2)"
                           r"\.(weight|bias)", k):
      out[f"{e}{m[1]}.blocks.{m[2]}.{_D2_BLOCK[m[3]]}.{m[4]}"] = arr
    elif m := re.fullmatch(r"layers\.(\d+)\.blocks\.(\d+)\.attn\.relative_position_bias_table", k):
      out[f"{e}{m[1]}.blocks.{m[2]}.{_D2_BLOCK['attn.relative_position_bias_table']}"] = arr
    elif m := re.fullmatch(r"layers\.(\d+)\.downsample\.(reduction\.weight|norm\.weight|norm\.bias)", k):
      out[f"{e}{m[1]}.downsample.{m[2]}"] = arr
    elif m := re.fullmatch(r"norm(\d+)\.(weight|bias)", k):
      out[f"{prefix}hidden_states_norms.stage{int(m[1]) + 1}.{m[2]}"] = arr
    else:
      raise UserError(f"detectron2 key {key!r} has no Swin mapping (absolute position embeddings are "
                      f"not supported)")
  if not out:
    raise UserError(f"no detectron2 Swin weights found (no keys start with {d2_prefix!r})")
  return out


# ---------------------------------------------------------------------------- whole-backbone helpers
def _source(src):
  """(keys, get) of a safetensors file/folder, a detectron2 .pkl, or a state_dict."""
  if isinstance(src, (str, os.PathLike)):
    path = os.fspath(src)
    if path.endswith(".pkl"):
      sd = d2_swin_to_hf(load_d2_pickle(path))
      return list(sd), sd.__getitem__
    reader = SafetensorsReader(path)
    return reader.keys(), reader.get
  return list(src.keys()), (lambda k: _to_numpy(src[k]))


def _identity_norms(params: dict, dims) -> None:
  for k, c in enumerate(dims, start=1):
    params.setdefault(f"norm_stage{k}", {"scale": np.ones((c,), np.float32),
                                         "bias": np.zeros((c,), np.float32)})


def import_swin(src, *, prefix: str | None = None, scan_layers: bool = True, dtype=None) -> dict:
  """HF Swin weights (safetensors file/folder, state_dict with torch or numpy values) or a
  detectron2 `.pkl` -> our SwinBackbone params. The layout (prefix, saved/module names, stage norms)
  is found from the keys; only keys under the prefix are read, one tensor at a time."""
  keys, get = _source(src)
  lay = swin_layout(keys, prefix)
  keys = [k for k in keys if k.startswith(lay["prefix"])]
  nm = NameMap(swin_rules(lay["prefix"], legacy=lay["legacy"], body=lay["body"],
                          stage_norms=lay["stage_norms"], scan_layers=scan_layers),
               ignore=swin_ignore(lay["prefix"]))
  params = nm.to_ours(keys, get, dtype=dtype)
  if not lay["stage_norms"]:
    c, n = params["patch_norm"]["scale"].shape[0], 1 + sum(k.startswith("merge") for k in params)
    _identity_norms(params, [c * 2 ** i for i in range(n)])
  return params


def export_swin(params: Mapping[str, Any], prefix: str = M2F_PREFIX, *, legacy: bool = True,
                scan_layers: bool = True) -> dict[str, np.ndarray]:
  """Our SwinBackbone params -> HF-named numpy tensors (default: the 'saved' layout inside a
  Mask2Former checkpoint)."""
  import flax.linen as nn

  params = nn.meta.unbox(params)
  if set(params) == {"params"}:
    params = params["params"]
  return dict(swin_name_map(prefix, legacy=legacy, scan_layers=scan_layers).to_theirs(params))


def hf_swin_config_dict(config) -> dict:
  """Our SwinConfig -> a transformers SwinConfig dict for a SwinBackbone with stage1..stageN out."""
  import dataclasses

  d = dataclasses.asdict(config)
  n = len(config.depths)
  d.update(depths=list(config.depths), num_heads=list(config.num_heads), model_type="swin",
           architectures=["SwinBackbone"], use_absolute_embeddings=False, qkv_bias=True,
           drop_path_rate=0.0, out_features=[f"stage{k}" for k in range(1, n + 1)],
           stage_names=["stem"] + [f"stage{k}" for k in range(1, n + 1)])
  return d


def save_swin_backbone(params: Mapping[str, Any], out_dir: str, config, *,
                       scan_layers: bool = True) -> list[str]:
  """Our params -> a folder `transformers.SwinBackbone.from_pretrained` loads (saved layout)."""
  import json

  from segearth_jax.convert.name_map import save_safetensors

  files = save_safetensors(export_swin(params, "", scan_layers=scan_layers).items(), out_dir)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(hf_swin_config_dict(config), f, indent=2, sort_keys=True)
  return files
