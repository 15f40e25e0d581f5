"""Mipha-style checkpoint (SigLIP tower + mm_projector + Phi-2 in one safetensors set): import -> our MLLM
forward equals the torch composition; export is bit-exact; LoRA adapter round trip; text loss."""
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from segearth_jax.convert import mipha
from segearth_jax.errors import UserError
from segearth_jax.losses import text_loss
from segearth_jax.models.lora import LoraConfig
from segearth_jax.models.mllm import MLLM
from segearth_jax.models.segearth import ModelConfig
from segearth_jax.tensor_io import SafetensorsReader
from test_phi import SHAPES, hf_tiny_phi

VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, image_size=42,
              patch_size=14, num_channels=3, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh")


def fake_mipha(tmp_path):
  torch.manual_seed(0)
  sig = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(vision_use_head=False, **VISION)).eval()
  phi = hf_tiny_phi(**SHAPES["odd_rotary"])
  proj = torch.nn.Sequential(torch.nn.Linear(32, 40), torch.nn.GELU(), torch.nn.Linear(40, 40)).eval()
  sd = {}
  for k, v in sig.state_dict().items():
    k = k[len("vision_model."):] if k.startswith("vision_model.") else k
    sd[mipha.VISION_PREFIX + k] = v.numpy()
  sd.update({mipha.PROJECTOR_PREFIX + k: v.detach().numpy() for k, v in proj.state_dict().items()})
  sd.update({k: v.numpy() for k, v in phi.state_dict().items()})
  sd = {k: np.ascontiguousarray(v) for k, v in sd.items() if "position_ids" not in k}
  d = str(tmp_path / "mipha")
  os.makedirs(d)
  save_file(sd, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
  cfg = phi.config.to_dict()
  cfg.update(model_type="mipha_phi", vision_config=dict(
      vision_tower=dict(VISION, mm_vision_select_layer=-2, vision_model_name_or_path="siglip"),
      mm_projector=dict(mm_projector_type="mlp2x_gelu", mm_hidden_size=32, hidden_size=40)))
  with open(os.path.join(d, "config.json"), "w") as f:
    json.dump(cfg, f)
  return d, sig, proj, phi, sd


def test_mipha_import_forward_export(tmp_path):
  d, sig, proj, phi, sd = fake_mipha(tmp_path)
  cfg = mipha.model_config_from_mipha(d)
  assert cfg.llm.partial_rotary_factor == 0.3 and cfg.vision.feature_layer == -2 and cfg.vision.image_size == 42
  params = mipha.import_mipha(d)
  assert set(params) == {"vision", "projector", "llm"}

  rng = np.random.default_rng(0)
  pixels = rng.standard_normal((2, 42, 42, 3)).astype(np.float32)
  ids = rng.integers(0, 96, (2, 16))
  image_start = np.array([2, 4])
  mask = np.ones((2, 16), np.int64)
  mask[1, 14:] = 0
  with torch.no_grad():
    feats = sig(torch.tensor(pixels).permute(0, 3, 1, 2), output_hidden_states=True).hidden_states[-2]
    img = proj(feats)
    emb = phi.model.embed_tokens(torch.tensor(ids)).clone()
    for b in range(2):
      emb[b, image_start[b]:image_start[b] + 9] = img[b]
    ref = phi(inputs_embeds=emb, attention_mask=torch.tensor(mask)).logits.numpy()
  cfg.lora.rank = 0  # plain Mipha: no LoRA children
  model = MLLM(ModelConfig.from_dict(cfg))
  batch = dict(siglip_image=pixels, input_ids=ids, attention_mask=mask, image_start=image_start)
  out = jax.jit(lambda p: model.apply({"params": p}, batch, with_seg_attn=False))(
      jax.tree_util.tree_map(jnp.asarray, params))
  real = mask.astype(bool)
  assert np.abs(np.asarray(out["logits"])[real] - ref[real]).max() <= 1e-4

  labels = np.where(rng.random((2, 16)) > 0.5, ids, -100)
  with torch.no_grad():
    ref_ce = torch.nn.functional.cross_entropy(torch.tensor(ref[:, :-1]).reshape(-1, 96),
                                               torch.tensor(labels[:, 1:]).reshape(-1), ignore_index=-100)
  assert abs(float(text_loss(jnp.asarray(ref), jnp.asarray(labels))) - float(ref_ce)) <= 1e-5

  # export: bit-exact, same key set
  out_dir = str(tmp_path / "export")
  mipha.export_mipha(params, out_dir, cfg)
  back = load_file(os.path.join(out_dir, "model.safetensors"))
  assert set(back) == set(sd)
  for k, v in sd.items():
    assert back[k].dtype == v.dtype and np.array_equal(back[k], v), k
  with open(os.path.join(out_dir, "config.json")) as f:
    c2 = json.load(f)
  assert c2["vision_config"]["vision_tower"]["mm_vision_select_layer"] == -2
  assert mipha.model_config_from_mipha(out_dir).llm.to_dict() == cfg.llm.to_dict()
  # the language part loads in transformers
  phi2 = transformers.PhiForCausalLM.from_pretrained(out_dir).eval()
  assert torch.equal(phi2.lm_head.bias, phi.lm_head.bias)

  # LoRA adapter round trip through the Mipha export
  lora = LoraConfig(rank=2, alpha=4.0, dropout=0.0, targets=("q_proj", "v_proj"))
  p2 = jax.tree_util.tree_map(np.asarray, params)
  for t in ("q_proj", "v_proj"):
    p2["llm"]["layers"]["self_attn"][t]["lora"] = dict(
        a=rng.standard_normal((2, 40, 2)).astype(np.float32), b=rng.standard_normal((2, 2, 40)).astype(np.float32))
  lo_dir = str(tmp_path / "lora")
  mipha.export_mipha(p2, lo_dir, cfg, lora=lora)
  keys = SafetensorsReader(os.path.join(lo_dir, "adapter", "adapter_model.safetensors")).keys()
  assert "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight" in keys and len(keys) == 8
  p3 = mipha.import_mipha(lo_dir, adapter=os.path.join(lo_dir, "adapter"))
  for t in ("q_proj", "v_proj"):
    for ab in "ab":
      assert np.array_equal(p3["llm"]["layers"]["self_attn"][t]["lora"][ab], p2["llm"]["layers"]["self_attn"][t]["lora"][ab])


def test_mipha_fields_flat_or_nested_rope_and_errors():
  """Older configs keep the rotary settings flat, newer ones under rope_parameters: both are read. A missing
  or ill-typed entry is a one-line UserError naming the key and the type expected."""
  vt = dict(VISION, mm_vision_select_layer=-1)
  base = dict(vocab_size=96, hidden_size=40, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              vision_config=dict(vision_tower=vt))
  flat = mipha.mipha_model_fields(dict(base, partial_rotary_factor=0.3, rope_theta=500))
  nested = mipha.mipha_model_fields(dict(base, rope_parameters=dict(partial_rotary_factor=0.3, rope_theta=500.0)))
  assert flat == nested
  assert flat["llm"]["rope_theta"] == 500.0 and flat["llm"]["num_key_value_heads"] == 4
  assert flat["vision"]["feature_layer"] == -1 and flat["vision"]["image_size"] == 42
  for cfg, words in ((dict(base, vision_config={}), "'vision_config.vision_tower'"),
                     (dict(base, hidden_size=40.0), "'hidden_size' is 40.0, expected int"),
                     ({k: v for k, v in base.items() if k != "vocab_size"}, "no 'vocab_size'")):
    with pytest.raises(UserError, match=re.escape(words)) as e:
      mipha.mipha_model_fields(cfg)
    assert "\n" not in str(e.value)
