"""PhiForCausalLM <-> our Phi params (both directions), a PEFT LoRA adapter, and token resizing.

HF keys (transformers 5): model.embed_tokens.weight, model.layers.{i}.input_layernorm.{weight,bias},
model.layers.{i}.self_attn.{q_proj,k_proj,v_proj,dense}.{weight,bias}, model.layers.{i}.mlp.{fc1,fc2}.*,
model.final_layernorm.*, lm_head.{weight,bias}. Per-layer tensors stack onto the nn.scan axis.
"""
from __future__ import annotations

import json
import os
from typing import Mapping

import numpy as np

from segearth_jax.convert import name_map as nm
from segearth_jax.models.lora import LoraConfig, merge_lora as _merge, split_lora
from segearth_jax.models.phi import PhiConfig

_LINEARS = (("self_attn/q_proj", "self_attn.q_proj"), ("self_attn/k_proj", "self_attn.k_proj"),
            ("self_attn/v_proj", "self_attn.v_proj"), ("self_attn/dense", "self_attn.dense"),
            ("mlp/fc1", "mlp.fc1"), ("mlp/fc2", "mlp.fc2"))


def phi_rules(prefix: str = "model.", lm_head_prefix: str = "lm_head.", ours: str = "") -> list[nm.Rule]:
  """Rules for one Phi; ``ours`` is our path prefix (e.g. 'llm/' inside the MLLM)."""
  L = f"{prefix}layers.{{i}}."
  rules = [nm.Rule(f"{ours}embed_tokens/embedding", f"{prefix}embed_tokens.weight")]
  rules += [nm.Rule(f"{ours}layers/input_layernorm/scale", L + "input_layernorm.weight", stack="i"),
            nm.Rule(f"{ours}layers/input_layernorm/bias", L + "input_layernorm.bias", stack="i")]
  for o, t in _LINEARS:
    rules += [nm.Rule(f"{ours}layers/{o}/kernel", L + f"{t}.weight", nm.LINEAR, stack="i"),
              nm.Rule(f"{ours}layers/{o}/bias", L + f"{t}.bias", stack="i")]
  rules += [nm.Rule(f"{ours}final_layernorm/scale", f"{prefix}final_layernorm.weight"),
            nm.Rule(f"{ours}final_layernorm/bias", f"{prefix}final_layernorm.bias"),
            nm.Rule(f"{ours}lm_head/kernel", f"{lm_head_prefix}weight", nm.LINEAR),
            nm.Rule(f"{ours}lm_head/bias", f"{lm_head_prefix}bias")]
  return rules


def lora_rules(targets, prefix: str = "base_model.model.model.", ours: str = "") -> list[nm.Rule]:
  """PEFT adapter keys (as saved by save_pretrained: no adapter name) for the adapted projections."""
  rules = []
  for o, t in _LINEARS:
    if o.split("/")[-1] in targets:
      rules += [nm.Rule(f"{ours}layers/{o}/lora/a", f"{prefix}layers.{{i}}.{t}.lora_A.weight", nm.LINEAR, stack="i"),
                nm.Rule(f"{ours}layers/{o}/lora/b", f"{prefix}layers.{{i}}.{t}.lora_B.weight", nm.LINEAR, stack="i")]
  return rules


def phi_name_map() -> nm.NameMap:
  return nm.NameMap(phi_rules(), ignore=(r".*rotary_emb\.inv_freq",))


def _state_dict_source(src):
  """(keys, get) for a folder / safetensors file path or an in-memory (torch or numpy) state dict."""
  if isinstance(src, (str, os.PathLike)):
    reader = nm.SafetensorsReader(str(src))
    return reader.keys(), reader.get

  def get(k):
    v = src[k]
    if hasattr(v, "detach"):
      v = v.detach().cpu().float().numpy() if str(v.dtype) == "torch.bfloat16" else v.detach().cpu().numpy()
    return np.asarray(v)
  return list(src.keys()), get


def import_phi(src, *, dtype=None, adapter: str | None = None) -> dict:
  """HF PhiForCausalLM weights (folder, file, or state dict) -> our param tree (numpy).

  ``adapter``: optional PEFT adapter folder whose lora_A/lora_B become the 'lora' children."""
  keys, get = _state_dict_source(src)
  params = phi_name_map().to_ours(keys, get, dtype=dtype)
  if adapter is not None:
    with open(os.path.join(adapter, "adapter_config.json")) as f:
      acfg = json.load(f)
    reader = nm.SafetensorsReader(os.path.join(adapter, "adapter_model.safetensors"))
    lora = nm.NameMap(lora_rules(acfg["target_modules"])).to_ours(reader.keys(), reader.get, dtype=dtype)
    params = _attach(params, lora)
  return params


def _attach(base, lora):
  out = dict(base)
  for k, v in lora.items():
    out[k] = _attach(base[k], v) if isinstance(v, Mapping) and k != "lora" else v
  return out


def lora_config_of(adapter_dir: str) -> LoraConfig:
  with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
    a = json.load(f)
  return LoraConfig(rank=a["r"], alpha=float(a["lora_alpha"]), dropout=float(a.get("lora_dropout", 0.0)),
                    targets=tuple(sorted(a["target_modules"])))


def export_phi(params: Mapping, out_dir: str, config: PhiConfig, *, lora: LoraConfig | None = None,
               merge_lora: bool = False, max_shard_bytes: int = 4 << 30) -> None:
  """Our params -> ``out_dir`` loadable by PhiForCausalLM.from_pretrained.

  With LoRA children present: ``merge_lora=True`` folds them into the kernels; otherwise the base
  weights go to ``out_dir`` and a PEFT adapter (adapter_config.json + adapter_model.safetensors) to
  ``out_dir/adapter`` (load with peft.PeftModel.from_pretrained(base, out_dir + '/adapter'))."""
  base, lora_params = split_lora(params)
  if lora_params and lora is None:
    raise ValueError("params hold LoRA children: pass lora=LoraConfig(...) to export them")
  if lora_params and merge_lora:
    base, lora_params = _merge(params, lora), {}
  nm.save_safetensors(phi_name_map().to_theirs(base), out_dir, max_shard_bytes=max_shard_bytes)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(config.to_hf_dict(), f, indent=2)
  if lora_params:
    write_peft_adapter(lora_params, os.path.join(out_dir, "adapter"), lora, base_model=out_dir)


def write_peft_adapter(lora_params: Mapping, adapter_dir: str, lora: LoraConfig, *, base_model: str = "",
                       rules=None) -> None:
  from safetensors.numpy import save_file

  os.makedirs(adapter_dir, exist_ok=True)
  rules = rules if rules is not None else lora_rules(lora.targets)
  tensors = {k: np.ascontiguousarray(v) for k, v in nm.NameMap(rules).to_theirs(lora_params)}
  save_file(tensors, os.path.join(adapter_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
  cfg = dict(peft_type="LORA", task_type="CAUSAL_LM", r=lora.rank, lora_alpha=lora.alpha,
             lora_dropout=lora.dropout, target_modules=list(lora.targets), bias="none",
             fan_in_fan_out=False, inference_mode=True, base_model_name_or_path=base_model)
  with open(os.path.join(adapter_dir, "adapter_config.json"), "w") as f:
    json.dump(cfg, f, indent=2)


# ------------------------------------------------------------------ token resizing
def _mean_init(old: np.ndarray, added: int, rng: np.random.Generator) -> np.ndarray:
  """transformers' mean_resizing: rows ~ N(mean, 1e-9 * cov) of the old rows, or the mean if cov is not PD."""
  w = old.astype(np.float64)
  mean = w.mean(0)
  cov = (w - mean).T @ (w - mean) / w.shape[0]
  try:
    chol = np.linalg.cholesky(1e-9 * cov)
  except np.linalg.LinAlgError:
    return np.repeat(mean[None], added, 0).astype(old.dtype)
  z = rng.standard_normal((added, w.shape[1]))
  return (mean[None] + z @ chol.T).astype(old.dtype)


def resize_token_embeddings(params: Mapping, new_size: int, pad_to_multiple_of: int | None = 64,
                            seed: int = 0) -> dict:
  """Grows embed_tokens rows and lm_head columns/bias to ``new_size`` (rounded up to the multiple), as
  transformers' resize_token_embeddings(mean_resizing=True) does; shrinking truncates."""
  if pad_to_multiple_of:
    new_size = -(-new_size // pad_to_multiple_of) * pad_to_multiple_of
  rng = np.random.default_rng(seed)
  out = dict(params)
  emb = np.asarray(params["embed_tokens"]["embedding"])
  old = emb.shape[0]
  if new_size <= old:
    out["embed_tokens"] = {"embedding": emb[:new_size]}
    out["lm_head"] = {"kernel": np.asarray(params["lm_head"]["kernel"])[:, :new_size],
                      "bias": np.asarray(params["lm_head"]["bias"])[:new_size]}
    return out
  added = new_size - old
  out["embed_tokens"] = {"embedding": np.concatenate([emb, _mean_init(emb, added, rng)], 0)}
  k = np.asarray(params["lm_head"]["kernel"])                          # [D, V]
  new_k = np.concatenate([k, _mean_init(k.T, added, rng).T], 1)
  b = np.asarray(params["lm_head"]["bias"])
  bias_new = rng.normal(b.astype(np.float64).mean(), 1e-9 * b.astype(np.float64).std(ddof=1), added)
  out["lm_head"] = {"kernel": new_k, "bias": np.concatenate([b, bias_new.astype(b.dtype)])}
  return out
