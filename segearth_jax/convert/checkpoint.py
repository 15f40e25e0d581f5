"""Whole-model checkpoints: the weights folder (`segearth convert from-hf`), and the PyTorch export
(`segearth convert to-torch`). Composes the per-part maps (mipha, mask2former, siglip/phi/swin/...); no
part's rules are written twice.

Weights folder W (framework neutral, what `--weights W` and `train.init_from=W` read):
  W/config.json                    the full experiment config (data.tokenizer points at W/tokenizer)
  W/model.safetensors(+ .index)    every param of SegEarthR2, keyed by our '/'-joined param path
  W/tokenizer/                     the tokenizer with [SEG] and <image>
  W/segearth_weights.json          marker + how it was made
A training workdir (config.json + orbax checkpoints/) is accepted wherever W is.

PyTorch export DIR (loaded by `torch_model.SegEarthR2Torch.from_pretrained`):
  DIR/config.json                  vision_config / text_config / mask2former_config + token ids + the
                                   experiment config (preprocessing, prompts)
  DIR/model.safetensors(+ .index)  keys as `SegEarthR2Torch.state_dict()` names them (module layout)
  DIR/adapter/                     PEFT LoRA adapter of the LLM (absent with --merge-lora)
  DIR/tokenizer/
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any, Mapping

import numpy as np

from segearth_jax.convert import name_map as nm
from segearth_jax.errors import UserError

MARKER = "segearth_weights.json"
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                              "experiments", "laserss_mipha3b.py")
# HF Mask2Former keeps learned queries; ours come from [SEG]. Exported as one zero row (unused).
EXPORT_NUM_QUERIES = 1


# ------------------------------------------------------------------------------------ weights folder
def _numpy_tree(tree):
  import jax
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def save_weights(params: Mapping, config, out_dir: str, tokenizer=None, *, note: dict | None = None) -> None:
  """Writes a weights folder. ``config``: the experiment ConfigDict; ``tokenizer``: saved to W/tokenizer."""
  os.makedirs(out_dir, exist_ok=True)
  flat = nm.flatten(params)
  nm.save_safetensors(((k, np.asarray(v)) for k, v in flat.items()), out_dir)
  cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  cfg = json.loads(json.dumps(cfg, default=list))
  if tokenizer is not None:
    tok_dir = os.path.join(out_dir, "tokenizer")
    tokenizer.save_pretrained(tok_dir)
    cfg["data"]["tokenizer"] = os.path.abspath(tok_dir)
  cfg["train"]["init_from"] = ""
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(cfg, f, indent=2)
  with open(os.path.join(out_dir, MARKER), "w") as f:
    json.dump(dict(format="segearth-weights", version=1, **(note or {})), f, indent=2)


def is_weights_dir(path: str) -> bool:
  return os.path.isfile(os.path.join(path, MARKER))


def load_params(path: str) -> dict:
  """A weights folder (from-hf / to-jax) or a training workdir -> nested dict of numpy (all params)."""
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise UserError(f"{path}: no such weights folder or workdir")
  if is_weights_dir(path):
    reader = nm.SafetensorsReader(path)
    return nm.unflatten({k: reader.get(k) for k in reader.keys()})
  if os.path.isdir(os.path.join(path, "checkpoints")) or os.path.isfile(os.path.join(path, "config.json")):
    return _load_workdir(path)
  raise UserError(f"{path}: neither a weights folder ({MARKER}) nor a training workdir (config.json)")


def _load_workdir(workdir: str) -> dict:
  import jax

  from segearth_jax import sharding as shd
  from segearth_jax.data.tokenizer import load_tokenizer
  from segearth_jax.evaluate import load_workdir_params
  from segearth_jax.train import TrainSetup, load_workdir_config

  config = load_workdir_config(workdir)
  tok = load_tokenizer(config.data.tokenizer)
  mesh = shd.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  setup = TrainSetup.create(config, mesh=mesh, vocab_size=len(tok))
  params, _ = load_workdir_params(setup, workdir)
  return _numpy_tree(params)


def _config_and_tokenizer(path: str):
  """(experiment config, tokenizer folder) of a weights folder or workdir."""
  from segearth_jax.train import load_workdir_config
  config = load_workdir_config(path)
  return config, config.data.tokenizer


# ------------------------------------------------------------------------------------ shape checks
def abstract_params(model_cfg, vocab_size: int | None) -> dict:
  """Our param shapes for a model config, without allocating them."""
  import functools

  import flax.linen as nn
  import jax
  import ml_collections

  from segearth_jax.models.segearth import build_model
  from segearth_jax.train import dummy_batch

  model = build_model(model_cfg, vocab_size)
  cfg = ml_collections.ConfigDict(dict(model=model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else model_cfg,
                                       data=dict(text_buckets=(8,))))
  batch = dummy_batch(cfg, 1, 8 + (cfg.model.vision.image_size // cfg.model.vision.patch_size) ** 2)
  tree = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), batch)["params"]
  return nm.flatten(nn.unbox(tree))


def check_shapes(params: Mapping, model_cfg, vocab_size: int | None, what: str) -> None:
  want = abstract_params(model_cfg, vocab_size)
  have = nm.flatten(params)
  missing = sorted(set(want) - set(have))
  extra = sorted(set(have) - set(want))
  wrong = [f"{k}: {tuple(np.shape(have[k]))} vs config {tuple(want[k].shape)}" for k in sorted(set(want) & set(have))
           if tuple(np.shape(have[k])) != tuple(want[k].shape)]
  if missing or extra or wrong:
    raise UserError(f"{what}: weights do not fit the config's model: missing {missing[:5]}, unexpected "
                    f"{extra[:5]}, shape mismatches {wrong[:5]}")


# ------------------------------------------------------------------------------------ from-hf
def _size_overrides(model_cfg, hf_model_cfg, m2f_params) -> list[str]:
  """`--config.model....=v` flags that make the config match the checkpoints (empty when it does)."""
  flags = []
  for part in ("vision", "llm"):
    for k, v in hf_model_cfg[part].items():
      if k in model_cfg[part] and k not in ("vocab_size",) and model_cfg[part][k] != v:
        flags.append(f"--config.model.{part}.{k}={v!r}")
  if hf_model_cfg.llm.vocab_size > model_cfg.llm.vocab_size:
    flags.append(f"--config.model.llm.vocab_size={hf_model_cfg.llm.vocab_size}")
  sw = m2f_params["swin"]
  embed = int(sw["patch_norm"]["scale"].shape[0])
  if embed != model_cfg.swin.embed_dim:
    flags.append(f"--config.model.swin.embed_dim={embed}")
  depths = tuple(int(np.shape(sw[f"stage{s}"]["blocks"]["fc1"]["kernel"])[0]) for s in range(len(
      [k for k in sw if k.startswith("stage")])))
  if depths != tuple(model_cfg.swin.depths):
    flags.append(f"--config.model.swin.depths={depths}")
  pd = m2f_params["pixel_decoder"]
  n_enc = int(np.shape(pd["encoder"]["fc1"]["kernel"])[0])
  if n_enc != model_cfg.pixel_decoder.encoder_layers:
    flags.append(f"--config.model.pixel_decoder.encoder_layers={n_enc}")
  n_dec = sum(k.startswith("layers_") for k in m2f_params["mask_decoder"])
  if n_dec != model_cfg.mask_decoder.num_layers:
    flags.append(f"--config.model.mask_decoder.num_layers={n_dec}")
  return flags


def _new_lora(llm: Mapping, lora_cfg, rng: np.random.Generator) -> dict:
  """PEFT's init: A ~ U(-1/sqrt(in), 1/sqrt(in)), B = 0, for every adapted projection."""
  out = dict(llm)
  layers = dict(out["layers"])
  attn = dict(layers["self_attn"])
  for t in lora_cfg.targets:
    node = dict(attn[t])
    k = node["kernel"]
    n, d_in, d_out = k.shape
    bound = 1.0 / np.sqrt(d_in)
    node["lora"] = {"a": rng.uniform(-bound, bound, (n, d_in, lora_cfg.rank)).astype(k.dtype),
                    "b": np.zeros((n, lora_cfg.rank, d_out), k.dtype)}
    attn[t] = node
  layers["self_attn"] = attn
  out["layers"] = layers
  return out


def from_hf(mipha_dir: str, mask2former: str, out_dir: str, config, *, seed: int = 0) -> dict:
  """Mipha (SigLIP + projector + Phi-2) + Mask2Former -> a weights folder. Returns the params."""
  from segearth_jax.convert.mask2former import import_mask2former
  from segearth_jax.convert.mipha import import_mipha, model_config_from_mipha
  from segearth_jax.convert.phi_map import resize_token_embeddings
  from segearth_jax.data.tokenizer import load_tokenizer
  from segearth_jax.models.lora import LoraConfig
  from segearth_jax.models.segearth import build_model

  if not os.path.isfile(os.path.join(mipha_dir, "config.json")):
    raise UserError(f"{mipha_dir}: no config.json (expected a Mipha/LLaVA-Phi folder)")
  m = config.model
  hf_cfg = model_config_from_mipha(mipha_dir, m)
  tok = load_tokenizer(mipha_dir)
  mask_head = import_mask2former(mask2former)
  flags = _size_overrides(m, hf_cfg, mask_head)
  if flags:
    raise UserError("the checkpoints do not match the config's model; rerun with:\n  " + " ".join(flags))
  vocab = build_model(m, len(tok)).config.llm.vocab_size
  params = import_mipha(mipha_dir)
  params["mask_head"] = mask_head
  rng = np.random.default_rng(seed)
  llm = params["llm"]
  if llm["embed_tokens"]["embedding"].shape[0] != vocab:  # the tokenizer outgrew the vocab: grow as HF does
    llm = resize_token_embeddings(llm, vocab, pad_to_multiple_of=None, seed=seed)
  if m.lora.rank:
    llm = _new_lora(llm, LoraConfig.from_dict(m.lora), rng)
  params["llm"] = llm
  d_in, d_out = int(m.llm.hidden_size), int(m.mask_decoder.hidden_dim)
  # flax Dense default (lecun normal) for the new [SEG] projector
  params["seg_projector"] = {"kernel": (rng.standard_normal((d_in, d_out)) / np.sqrt(d_in)).astype(np.float32),
                             "bias": np.zeros((d_out,), np.float32)}
  check_shapes(params, m, len(tok), f"from-hf ({mipha_dir}, {mask2former})")
  save_weights(params, config, out_dir, tok, note=dict(mipha=os.path.abspath(mipha_dir),
                                                      mask2former=os.path.abspath(mask2former), seed=seed))
  return params


def from_hf_cli(args) -> int:
  from segearth_jax.config import load_config
  config = load_config(args.config or DEFAULT_CONFIG, getattr(args, "overrides", None) or [])
  from_hf(args.mipha, args.mask2former, args.out, config, seed=int(config.train.seed))
  print(f"written: {args.out} (use --weights {args.out} or --config.train.init_from={args.out})")
  return 0


# ------------------------------------------------------------------------------------ to-torch
def torch_name_map(model_cfg, *, input_projections: bool) -> nm.NameMap:
  """Our params (LoRA split off) <-> `SegEarthR2Torch.state_dict()` keys (module layout)."""
  from segearth_jax.convert.mask_decoder_map import mask_decoder_ignore, mask_decoder_rules
  from segearth_jax.convert.phi_map import phi_rules
  from segearth_jax.convert.pixel_decoder_map import pixel_decoder_rules
  from segearth_jax.convert.siglip_map import projector_rules, siglip_ignore, siglip_rules
  from segearth_jax.convert.swin_map import swin_ignore, swin_rules

  mh = "mask_head."
  rules = [*siglip_rules("vision_tower.", "vision/", scan_layers=model_cfg.scan_layers),
           *projector_rules("projector.", "projector/"),
           *phi_rules("llm.model.", "llm.lm_head.", ours="llm/"),
           nm.Rule("seg_projector/kernel", "seg_projector.weight", nm.LINEAR),
           nm.Rule("seg_projector/bias", "seg_projector.bias"),
           *swin_rules(f"{mh}pixel_level_module.encoder.", "mask_head/swin/", legacy=False,
                       scan_layers=model_cfg.scan_layers),
           *pixel_decoder_rules(f"{mh}pixel_level_module.decoder.", "mask_head/pixel_decoder/"),
           *mask_decoder_rules(f"{mh}transformer_module.", "mask_head/mask_decoder/",
                               input_projections=input_projections,
                               mask_embed_layers=int(model_cfg.mask_decoder.mask_embed_layers))]
  ignore = [*siglip_ignore("vision_tower."), *swin_ignore(f"{mh}pixel_level_module.encoder."),
            *mask_decoder_ignore(f"{mh}transformer_module."), r".*rotary_emb\.inv_freq"]
  return nm.NameMap(rules, ignore)


def mask2former_config_dict(model_cfg, *, heads: int) -> dict:
  """A transformers Mask2FormerConfig (as a dict) for our swin / pixel decoder / mask decoder sizes."""
  from segearth_jax.convert.swin_map import hf_swin_config_dict
  from segearth_jax.models.swin import SwinConfig

  sw = hf_swin_config_dict(SwinConfig.from_dict(model_cfg.swin))
  sw.pop("architectures", None)
  pd, md = model_cfg.pixel_decoder, model_cfg.mask_decoder
  return dict(backbone_config=sw, feature_size=int(pd.feature_size), mask_feature_size=int(pd.mask_feature_size),
              hidden_dim=int(md.hidden_dim), encoder_feedforward_dim=int(pd.encoder_feedforward_dim),
              encoder_layers=int(pd.encoder_layers), decoder_layers=int(md.num_layers) + 1,
              num_attention_heads=int(heads), dim_feedforward=int(md.dim_feedforward),
              pre_norm=bool(md.pre_norm), enforce_input_projection=bool(md.get("enforce_input_projection", False)),
              common_stride=4, feature_strides=[4, 8, 16, 32], num_queries=EXPORT_NUM_QUERIES, dropout=0.0,
              use_auxiliary_loss=False)


def torch_config_dict(config, params: Mapping, tokenizer, *, lora: dict | None) -> dict:
  from segearth_jax.convert.siglip_map import _hf_config_dict as siglip_hf
  from segearth_jax.data.tokenizer import image_token_id, seg_token_id
  from segearth_jax.models.phi import PhiConfig
  from segearth_jax.models.siglip import SiglipConfig

  m = config.model
  text = PhiConfig.from_dict(m.llm).to_hf_dict()
  text["vocab_size"] = int(np.shape(params["llm"]["embed_tokens"]["embedding"])[0])
  text["eos_token_id"] = tokenizer.eos_token_id
  return dict(
      architectures=["SegEarthR2Torch"], model_type="segearth_r2",
      vision_config=siglip_hf(SiglipConfig.from_dict(m.vision)),
      feature_layer=int(m.vision.feature_layer), projector_hidden_act=str(m.projector_hidden_act),
      text_config=text,
      mask2former_config=mask2former_config_dict(m, heads=int(m.pixel_decoder.num_attention_heads)),
      mask_decoder_heads=int(m.mask_decoder.num_attention_heads),
      seg_token_id=seg_token_id(tokenizer), image_token_id=image_token_id(tokenizer),
      eos_token_id=tokenizer.eos_token_id, max_seg=int(m.max_seg), lora=lora,
      segearth_config=json.loads(config.to_json_best_effort()))


def export_torch(params: Mapping, config, tokenizer_dir: str, out_dir: str, *, merge_lora: bool = False) -> None:
  """Our params -> DIR that `SegEarthR2Torch.from_pretrained` loads (see the module docstring)."""
  from segearth_jax.convert.mask_decoder_map import export_unused
  from segearth_jax.convert.phi_map import write_peft_adapter
  from segearth_jax.data.tokenizer import load_tokenizer
  from segearth_jax.models.lora import LoraConfig, merge_lora as _merge, split_lora

  m = config.model
  tok = load_tokenizer(tokenizer_dir)
  params = dict(params)
  llm_base, llm_lora = split_lora(params["llm"])
  lora_cfg = LoraConfig.from_dict(m.lora) if llm_lora else None
  if llm_lora and merge_lora:
    llm_base, llm_lora = _merge(params["llm"], lora_cfg), {}
  params["llm"] = llm_base
  proj = any(k.startswith("input_proj_") for k in params["mask_head"]["mask_decoder"])
  names = torch_name_map(m, input_projections=proj)

  def tensors():
    for k, v in names.to_theirs(params):
      yield k, np.asarray(v)
    yield from export_unused("mask_head.transformer_module.", EXPORT_NUM_QUERIES, int(m.mask_decoder.hidden_dim))
    # SwinModel's final norm exists in the HF backbone but is never applied: identity
    width = int(m.swin.embed_dim) * 2 ** (len(m.swin.depths) - 1)
    yield "mask_head.pixel_level_module.encoder.swin.layernorm.weight", np.ones((width,), np.float32)
    yield "mask_head.pixel_level_module.encoder.swin.layernorm.bias", np.zeros((width,), np.float32)

  os.makedirs(out_dir, exist_ok=True)
  nm.save_safetensors(tensors(), out_dir)
  lora = None
  if llm_lora:
    write_peft_adapter(llm_lora, os.path.join(out_dir, "adapter"), lora_cfg, base_model=out_dir)
    lora = dict(rank=lora_cfg.rank, alpha=lora_cfg.alpha, targets=list(lora_cfg.targets), adapter="adapter")
  elif merge_lora and lora_cfg is not None:
    lora = dict(merged=True)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(torch_config_dict(config, params, tok, lora=lora), f, indent=2)
  tok_out = os.path.join(out_dir, "tokenizer")
  if os.path.isdir(tok_out):
    shutil.rmtree(tok_out)
  tok.save_pretrained(tok_out)


def to_torch_cli(args) -> int:
  if not os.path.isdir(args.workdir):
    raise UserError(f"{args.workdir}: no such workdir or weights folder")
  config, tok_dir = _config_and_tokenizer(args.workdir)
  params = load_params(args.workdir)
  export_torch(params, config, tok_dir, args.out, merge_lora=bool(args.merge_lora))
  print(f"written: {args.out} (load with segearth_jax.convert.torch_model.SegEarthR2Torch.from_pretrained)")
  return 0
