"""from-hf on tiny random HF checkpoints (Mipha-style folder + Mask2FormerModel), then to-torch: every tensor
that was not newly made (LoRA, [SEG] projector, unused learned queries) comes back bit for bit."""
import json
import os

import numpy as np
import torch
from safetensors.numpy import save_file
from safetensors import safe_open

from train_fixtures import tiny_config

from segearth_jax.convert.checkpoint import export_torch, from_hf, load_params, mask2former_config_dict
from segearth_jax.convert.mipha import mipha_config_dict
from segearth_jax.data.tokenizer import train_toy_tokenizer
from segearth_jax.experiment import EVAL_PROMPT, PHI_SYSTEM


def _sd(module):
  return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def test_from_hf_then_to_torch_is_bit_exact(tmp_path):
  from transformers import (Mask2FormerConfig, Mask2FormerModel, PhiConfig, PhiForCausalLM, SiglipVisionConfig,
                            SiglipVisionModel, SwinConfig)

  from segearth_jax.models.phi import PhiConfig as OurPhi

  config = tiny_config()
  m = config.model
  torch.manual_seed(0)
  v = m.vision
  siglip = SiglipVisionModel(SiglipVisionConfig(
      hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=v.num_hidden_layers,
      num_attention_heads=v.num_attention_heads, image_size=v.image_size, patch_size=v.patch_size))
  proj = torch.nn.Sequential(torch.nn.Linear(v.hidden_size, m.llm.hidden_size), torch.nn.GELU(),
                             torch.nn.Linear(m.llm.hidden_size, m.llm.hidden_size))
  hf_phi = OurPhi.from_dict(m.llm).to_hf_dict()
  phi = PhiForCausalLM(PhiConfig(**{k: x for k, x in hf_phi.items() if k not in ("architectures", "model_type")}))
  mipha = tmp_path / "mipha"
  os.makedirs(mipha)
  tensors = {f"model.vision_tower.vision_model.{k}": x for k, x in _sd(siglip).items()}
  tensors |= {f"model.mm_projector.{k}": x for k, x in _sd(proj).items()}
  tensors |= _sd(phi)
  save_file(tensors, str(mipha / "model.safetensors"))
  with open(mipha / "config.json", "w") as f:
    json.dump(mipha_config_dict(m), f)
  train_toy_tokenizer([PHI_SYSTEM, EVAL_PROMPT, "a ship"], str(mipha), vocab_size=400)

  mc = mask2former_config_dict(m, heads=m.pixel_decoder.num_attention_heads)
  bb = {k: x for k, x in mc.pop("backbone_config").items() if k not in ("model_type",)}
  m2f = Mask2FormerModel(Mask2FormerConfig(backbone_config=SwinConfig(**bb), **mc))
  with torch.no_grad():  # non-default norms so identity-initialised tensors are checked too
    for name, p in m2f.named_parameters():
      if "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  m2f.save_pretrained(str(tmp_path / "m2f"))

  W = str(tmp_path / "W")
  from_hf(str(mipha), str(tmp_path / "m2f"), W, config, seed=0)
  params = load_params(W)
  assert params["llm"]["layers"]["self_attn"]["q_proj"]["lora"]["a"].shape == (2, m.llm.hidden_size, m.lora.rank)
  from segearth_jax.train import load_workdir_config
  cfg_w = load_workdir_config(W)
  assert os.path.isdir(cfg_w.data.tokenizer)
  out = str(tmp_path / "torch")
  export_torch(params, cfg_w, cfg_w.data.tokenizer, out)

  with safe_open(os.path.join(out, "model.safetensors"), "np") as h:
    got = {k: h.get_tensor(k) for k in h.keys()}
  want = {f"vision_tower.{k}": x for k, x in _sd(siglip).items() if not k.endswith("position_ids")
          and not k.startswith("head.")}  # the pooling head is not part of LLaVA-style models
  want |= {f"projector.{k}": x for k, x in _sd(proj).items()}
  want |= {f"llm.{k}": x for k, x in _sd(phi).items()}
  skip = ("queries_features", "queries_embedder", "relative_position_index", "swin.layernorm.")
  want |= {f"mask_head.{k}": x for k, x in _sd(m2f).items() if not any(s in k for s in skip)}
  assert set(want) <= set(got), sorted(set(want) - set(got))[:5]
  for k, x in want.items():
    assert got[k].dtype == x.dtype and np.array_equal(got[k], x), k
  new = set(got) - set(want)
  assert all(k.startswith("seg_projector.") or any(s in k for s in skip) for k in new), new
