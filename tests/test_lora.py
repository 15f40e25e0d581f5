"""LoRA vs peft on PhiForCausalLM; merge == unmerged forward; PEFT adapter export loads in peft."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import peft
import torch
import transformers

from segearth_jax.convert import phi_map
from segearth_jax.models.lora import LoraConfig, lora_mask, merge_lora, split_lora, unmerge_lora
from segearth_jax.models.phi import Phi, PhiConfig
from test_phi import SHAPES, hf_tiny_phi

LORA = LoraConfig(rank=4, alpha=8.0, dropout=0.05, targets=("q_proj", "v_proj"))


def peft_model(hf):
  pm = peft.get_peft_model(hf, peft.LoraConfig(r=LORA.rank, lora_alpha=LORA.alpha, lora_dropout=LORA.dropout,
                                               target_modules=list(LORA.targets)))
  torch.manual_seed(1)
  with torch.no_grad():  # peft starts B at zero: make the update non-zero
    for n, p in pm.named_parameters():
      if "lora_B" in n:
        p.normal_(0, 0.3)
  return pm.eval()


@functools.partial(jax.jit, static_argnums=0)
def _forward(model, params, ids):
  e = model.apply({"params": params}, ids, method=Phi.embed)
  return model.apply({"params": params}, e)["logits"]


def test_lora_matches_peft_and_adapter_round_trip(tmp_path):
  hf = hf_tiny_phi(**SHAPES["odd_rotary"])
  pm = peft_model(hf)
  ids = np.random.default_rng(0).integers(0, 96, (2, 8))
  with torch.no_grad():
    ref = pm(torch.tensor(ids)).logits.numpy()
  base = pm.get_base_model()
  sd = {k.replace(".base_layer", ""): v for k, v in base.state_dict().items() if "lora_" not in k}
  params = phi_map.import_phi(sd)
  pm.save_pretrained(str(tmp_path / "peft"))
  params = phi_map.import_phi(sd, adapter=str(tmp_path / "peft"))
  assert phi_map.lora_config_of(str(tmp_path / "peft")) == LORA
  params = jax.tree_util.tree_map(jnp.asarray, params)
  assert params["layers"]["self_attn"]["q_proj"]["lora"]["a"].shape == (2, 40, 4)
  model = Phi(PhiConfig.from_hf(hf.config), lora=LORA)
  out = np.asarray(_forward(model, params, jnp.asarray(ids)))
  assert np.abs(out - ref).max() <= 1e-4, np.abs(out - ref).max()

  # Export base + PEFT adapter; peft loads them and gives the same logits.
  out_dir = str(tmp_path / "export")
  phi_map.export_phi(params, out_dir, PhiConfig.from_hf(hf.config), lora=LORA)
  base2 = transformers.PhiForCausalLM.from_pretrained(out_dir)
  pm2 = peft.PeftModel.from_pretrained(base2, out_dir + "/adapter").eval()
  with torch.no_grad():
    ref2 = pm2(torch.tensor(ids)).logits.numpy()
  assert np.abs(ref2 - ref).max() <= 1e-5

  # Merged export == peft's merge_and_unload.
  merged_dir = str(tmp_path / "merged")
  phi_map.export_phi(params, merged_dir, PhiConfig.from_hf(hf.config), lora=LORA, merge_lora=True)
  hm = transformers.PhiForCausalLM.from_pretrained(merged_dir).eval()
  with torch.no_grad():
    ref3 = hm(torch.tensor(ids)).logits.numpy()
  assert np.abs(ref3 - ref).max() <= 1e-4


def test_merge_equals_unmerged_forward_and_unmerge_inverts():
  cfg = PhiConfig.from_dict(SHAPES["five_heads"])
  model = Phi(cfg, lora=LORA)
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 4, 60)))["params"])
  # give B non-zero values
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.2 if any(getattr(k, "key", None) == "b" for k in p) else x, params)
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 128, (2, 6)))
  y = _forward(model, params, ids)
  merged = merge_lora(params, LORA)
  assert "lora" not in merged["layers"]["self_attn"]["q_proj"]
  y2 = _forward(Phi(cfg), merged, ids)
  assert np.abs(np.asarray(y) - np.asarray(y2)).max() <= 1e-4
  _, lora_only = split_lora(params)
  back = unmerge_lora(merged, lora_only, LORA)
  diff = jax.tree_util.tree_map(lambda a, b: float(jnp.abs(a - b).max()), back, params)
  assert max(jax.tree_util.tree_leaves(diff)) <= 1e-6
  mask = lora_mask(params)
  flags = {jax.tree_util.keystr(p): m for p, m in jax.tree_util.tree_leaves_with_path(mask)}
  assert sum(flags.values()) == 4 and all(("lora" in k) == v for k, v in flags.items())


def test_lora_dropout_active_only_when_not_deterministic():
  cfg = PhiConfig.from_dict(SHAPES["odd_rotary"])
  model = Phi(cfg, lora=LoraConfig(rank=2, alpha=4.0, dropout=0.5))
  x = jax.random.normal(jax.random.PRNGKey(2), (1, 3, 40))
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), x)["params"])
  params = jax.tree_util.tree_map_with_path(
      lambda p, v: v + 0.5 if any(getattr(k, "key", None) == "b" for k in p) else v, params)
  run = jax.jit(lambda p, key: (model.apply({"params": p}, x)["logits"],
                                model.apply({"params": p}, x, deterministic=False, rngs={"dropout": key})["logits"]))
  a, b = run(params, jax.random.PRNGKey(1))
  assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3
