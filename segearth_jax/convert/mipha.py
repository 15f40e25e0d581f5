"""Mipha / LLaVA-Phi checkpoints (vision tower + mm_projector + Phi-2 in one safetensors set) <-> our
MLLM params {'vision', 'projector', 'llm'}.

Key layout (public `zhuyiche/llava-phi`, mipha/model): MiphaPhiForCausalLM.model is a PhiModel that also
holds `vision_tower` (a SigLIP tower whose transformer is `.vision_model`) and `mm_projector`
(Sequential(Linear, GELU, Linear) for 'mlp2x_gelu'); lm_head has a bias. So:
  model.vision_tower.vision_model.*   -> vision/*
  model.mm_projector.{0,2}.*          -> projector/fc1, fc2
  model.embed_tokens / model.layers.{i} / model.final_layernorm, lm_head.*  -> llm/*
config.json: a PhiConfig (model_type 'mipha_phi') plus vision_config = {'vision_tower': {SigLIP fields,
mm_vision_select_layer, ...}, 'mm_projector': {'mm_projector_type', 'mm_hidden_size', 'hidden_size'}}.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import ml_collections

from segearth_jax.convert import name_map as nm
from segearth_jax.convert.phi_map import (_attach, _state_dict_source, lora_rules, phi_rules,
                                          write_peft_adapter)
from segearth_jax.convert.siglip_map import projector_rules, siglip_ignore, siglip_rules
from segearth_jax.models.lora import LoraConfig, merge_lora as _merge, split_lora
from segearth_jax.models.phi import PhiConfig

VISION_PREFIX = "model.vision_tower.vision_model."
PROJECTOR_PREFIX = "model.mm_projector."
_SIGLIP_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                  "patch_size", "num_channels", "layer_norm_eps", "hidden_act")


def mipha_name_map() -> nm.NameMap:
  rules = (phi_rules("model.", "lm_head.", ours="llm/") + siglip_rules(VISION_PREFIX, "vision")
           + projector_rules(PROJECTOR_PREFIX, "projector"))
  return nm.NameMap(rules, ignore=tuple(siglip_ignore(VISION_PREFIX)) + (r".*rotary_emb\.inv_freq",))


def model_config_from_mipha(mipha_cfg: Mapping | str, base: ml_collections.ConfigDict | None = None):
  """Mipha config.json (dict or path) -> our model ConfigDict's vision/llm/projector fields (on ``base``)."""
  if isinstance(mipha_cfg, (str, os.PathLike)):
    path = os.path.join(mipha_cfg, "config.json") if os.path.isdir(mipha_cfg) else mipha_cfg
    with open(path) as f:
      mipha_cfg = json.load(f)
  d = dict(mipha_cfg)
  from segearth_jax import presets
  cfg = ml_collections.ConfigDict(base.to_dict()) if base is not None else presets.model_config("tiny")
  rope = d.get("rope_parameters") or {}
  llm = dict(vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
             num_hidden_layers=d["num_hidden_layers"], num_attention_heads=d["num_attention_heads"],
             num_key_value_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
             partial_rotary_factor=rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 0.5)),
             rope_theta=rope.get("rope_theta", d.get("rope_theta", 10000.0)),
             layer_norm_eps=d.get("layer_norm_eps", 1e-5),
             max_position_embeddings=d.get("max_position_embeddings", 2048),
             hidden_act=d.get("hidden_act", "gelu_new"))
  for k, v in llm.items():
    cfg.llm[k] = v
  vt = d["vision_config"]["vision_tower"]
  for k in _SIGLIP_FIELDS:
    if k in vt:
      cfg.vision[k] = vt[k]
  cfg.vision.feature_layer = int(vt.get("mm_vision_select_layer", -2))
  proj = d["vision_config"].get("mm_projector", {})
  if proj.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
    raise ValueError(f"only the 'mlp2x_gelu' projector is supported, got {proj.get('mm_projector_type')!r}")
  cfg.projector_hidden_act = "gelu"
  return cfg


def mipha_config_dict(model_cfg) -> dict:
  """Our model ConfigDict -> a Mipha config.json."""
  phi = PhiConfig.from_dict(model_cfg.llm).to_hf_dict()
  phi.update(model_type="mipha_phi", architectures=["MiphaPhiForCausalLM"])
  v = model_cfg.vision
  vt = {k: v[k] for k in _SIGLIP_FIELDS}
  vt.update(model_type="mipha_vision_model", mm_vision_select_layer=int(v.feature_layer),
            mm_vision_select_feature="patch", vision_model_name_or_path="siglip")
  phi["vision_config"] = dict(vision_tower=vt, mm_projector=dict(
      model_type="mipha_projector", mm_projector_type="mlp2x_gelu", mm_hidden_size=v.hidden_size,
      hidden_size=model_cfg.llm.hidden_size))
  return phi


def import_mipha(src, *, dtype=None, adapter: str | None = None) -> dict:
  """Mipha folder / file / state dict -> {'vision', 'projector', 'llm'} (numpy). ``adapter``: a PEFT
  LoRA folder for the language model (keys base_model.model.model.layers.{i}...)."""
  keys, get = _state_dict_source(src)
  params = mipha_name_map().to_ours(keys, get, dtype=dtype)
  if adapter is not None:
    with open(os.path.join(adapter, "adapter_config.json")) as f:
      targets = json.load(f)["target_modules"]
    reader = nm.SafetensorsReader(os.path.join(adapter, "adapter_model.safetensors"))
    lora = nm.NameMap(lora_rules(targets, ours="llm/")).to_ours(reader.keys(), reader.get, dtype=dtype)
    params = _attach(params, lora)
  return params


def export_mipha(params: Mapping[str, Any], out_dir: str, model_cfg, *, lora: LoraConfig | None = None,
                 merge_lora: bool = False, max_shard_bytes: int = 4 << 30) -> None:
  """Our MLLM params -> a Mipha folder (safetensors + config.json); LoRA merged, or written as a PEFT
  adapter under ``out_dir/adapter``."""
  params = {k: params[k] for k in ("vision", "projector", "llm")}
  base, lora_params = split_lora(params)
  if lora_params and lora is None:
    raise ValueError("params hold LoRA children: pass lora=LoraConfig(...) to export them")
  if lora_params and merge_lora:
    base = dict(base, llm=_merge(params["llm"], lora))
    lora_params = {}
  nm.save_safetensors(mipha_name_map().to_theirs(base), out_dir, max_shard_bytes=max_shard_bytes)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(mipha_config_dict(model_cfg), f, indent=2)
  if lora_params:
    write_peft_adapter(lora_params["llm"], os.path.join(out_dir, "adapter"), lora, base_model=out_dir)
