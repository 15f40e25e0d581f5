"""SigLIP tower vs transformers' SiglipVisionModel, with weights copied through our name map."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import SiglipVisionConfig, SiglipVisionModel

from segearth_jax import sharding
from segearth_jax.convert.name_map import ConversionError, NameMap
from segearth_jax.convert.siglip_map import (export_siglip, import_siglip, siglip_ignore,
                                             siglip_rules)
from segearth_jax.errors import UserError
from segearth_jax.models.siglip import SiglipConfig, SiglipVisionTower
from segearth_jax.presets import model_config

# (hf kwargs, head present in the HF model, our layer layout)
SHAPES = {
    "28px_p14_2L_2H": (dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, image_size=28, patch_size=14), False, True),
    "42px_p7_3L_3H_odd": (dict(hidden_size=15, intermediate_size=37, num_hidden_layers=3,
                               num_attention_heads=3, image_size=42, patch_size=7), True, False),
}


def _hf_model(kw, use_head, seed=0):
  torch.manual_seed(seed)
  cfg = SiglipVisionConfig(**kw, vision_use_head=use_head, attn_implementation="eager")
  model = SiglipVisionModel(cfg).eval()
  # random, non-trivial LayerNorm/bias values (HF inits them to 1/0)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "layer_norm" in name or "layernorm" in name or name.endswith(".bias"):
        p.add_(0.2 * torch.randn_like(p))
  return model


def _pixels(kw, batch=2, seed=1):
  g = torch.Generator().manual_seed(seed)
  return torch.randn(batch, kw.get("num_channels", 3), kw["image_size"], kw["image_size"], generator=g)


@pytest.mark.parametrize("name", list(SHAPES))
def test_hidden_states_match_transformers(name):
  kw, use_head, scan = SHAPES[name]
  model = _hf_model(kw, use_head)
  x = _pixels(kw)
  with torch.no_grad():
    out = model(pixel_values=x, output_hidden_states=True)
  ref_hidden = [h.numpy() for h in out.hidden_states]
  assert len(ref_hidden) == kw["num_hidden_layers"] + 1

  # 5.x state_dict has no 'vision_model.' prefix; head.* must be dropped by the ignore list
  params = import_siglip(model.state_dict(), scan_layers=scan)
  cfg = SiglipConfig.from_hf(model.config, feature_layer=-2)
  tower = SiglipVisionTower(cfg, scan_layers=scan)
  pix = jnp.asarray(x.numpy().transpose(0, 2, 3, 1))  # NCHW -> NHWC

  run_all = jax.jit(lambda p, v: tower.apply({"params": p}, v, output_hidden_states=True))
  feats_all, hidden, last = run_all(params, pix)
  assert hidden.shape[0] == len(ref_hidden)
  for i, ref in enumerate(ref_hidden):
    np.testing.assert_allclose(hidden[i], ref, atol=1e-4, rtol=0, err_msg=f"hidden_states[{i}]")
  np.testing.assert_allclose(last, out.last_hidden_state.numpy(), atol=1e-4, rtol=0)
  np.testing.assert_allclose(feats_all, ref_hidden[-2], atol=1e-4, rtol=0)

  # the feature path runs only the layers up to feature_layer and still matches hidden_states[-2]
  feats = jax.jit(lambda p, v: tower.apply({"params": p}, v))(params, pix)
  np.testing.assert_allclose(feats, ref_hidden[-2], atol=1e-4, rtol=0)
  assert np.abs(ref_hidden[-1] - ref_hidden[-2]).max() > 1e-2  # the check above can tell layers apart
  if scan:  # jax.nn.dot_product_attention path
    fused = SiglipVisionTower(cfg, attention_impl="fused")
    np.testing.assert_allclose(jax.jit(fused.apply)({"params": params}, pix), ref_hidden[-2],
                               atol=1e-4, rtol=0)


def test_feature_layer_index_and_size_checks():
  cfg = SiglipConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=3, num_attention_heads=2,
                     image_size=28, patch_size=14, feature_layer=-2)
  assert cfg.feature_index == 2 and cfg.num_patches == 4
  assert SiglipConfig(**{**cfg.__dict__, "feature_layer": 0}).feature_index == 0
  with pytest.raises(UserError, match="feature_layer"):
    SiglipConfig(**{**cfg.__dict__, "feature_layer": 4}).feature_index
  with pytest.raises(UserError, match="unknown field"):
    SiglipConfig.from_dict({"hidden_size": 8, "hiden_act": "gelu"})
  vis = SiglipConfig.from_dict(model_config("mipha3b").vision)
  assert (vis.hidden_size, vis.num_patches, vis.feature_index) == (1152, 729, 26)
  with pytest.raises(UserError, match="28x28x3"):
    SiglipVisionTower(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 14, 14, 3)))


def test_roundtrip_bit_exact_and_from_pretrained(tmp_path):
  kw, _, _ = SHAPES["42px_p7_3L_3H_odd"]
  model = _hf_model(kw, use_head=True, seed=3)
  src = {k: v.numpy() for k, v in model.state_dict().items()}
  model.save_pretrained(tmp_path / "hf")
  params = import_siglip(str(tmp_path / "hf"))  # from a safetensors folder

  out = tmp_path / "ours"
  export_siglip(params, str(out), model.config)
  with safe_open(str(out / "model.safetensors"), "np") as f:
    got = {k: f.get_tensor(k) for k in f.keys()}
  want = {"vision_model." + k: v for k, v in src.items() if not k.startswith("head.")}
  assert set(got) == set(want)
  for k, v in want.items():
    assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
    assert np.array_equal(got[k], v), k  # bit-exact

  loaded, info = SiglipVisionModel.from_pretrained(str(out), output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  assert loaded.config.vision_use_head is False
  for k, v in loaded.state_dict().items():
    assert np.array_equal(v.numpy(), src[k]), k

  # the unstacked layout exports the same tensors
  flat = import_siglip(str(out), scan_layers=False)
  export_siglip(flat, str(tmp_path / "flat"), model.config, scan_layers=False)
  with safe_open(str(tmp_path / "flat" / "model.safetensors"), "np") as f:
    assert all(np.array_equal(f.get_tensor(k), want[k]) for k in want)


def test_strict_import_rejects_unknown_keys():
  kw, _, _ = SHAPES["28px_p14_2L_2H"]
  sd = {k: v.numpy() for k, v in _hf_model(kw, use_head=False).state_dict().items()}
  sd["encoder.layers.0.self_attn.extra.weight"] = np.zeros(3, np.float32)
  nm = NameMap(siglip_rules(""), ignore=siglip_ignore(""))
  with pytest.raises(ConversionError, match="no rule"):
    nm.to_ours(sd.keys(), sd.__getitem__)
  del sd["encoder.layers.0.self_attn.extra.weight"]
  assert import_siglip(sd)["encoder"]["layers"]["mlp"]["fc2"]["bias"].shape == (2, 32)
  for scan in (True, False):  # a layer that lacks one tensor is an error in both layouts
    with pytest.raises(ConversionError, match="layer counts differ|missing"):
      import_siglip({k: v for k, v in sd.items() if k != "encoder.layers.1.mlp.fc2.bias"},
                    scan_layers=scan)
  with pytest.raises(ConversionError, match="not 0..1"):
    import_siglip({k: v for k, v in sd.items() if k != "encoder.layers.0.mlp.fc2.bias"})


def test_sharded_jit_equals_unsharded():
  cfg = SiglipConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                     image_size=28, patch_size=14, feature_layer=-1)
  pix = jax.random.normal(jax.random.PRNGKey(1), (4, 28, 28, 3))
  plain = SiglipVisionTower(cfg)
  boxed = plain.init(jax.random.PRNGKey(0), pix)
  params = jax.tree_util.tree_map(lambda x: x + 0.0, jax.device_get(nn.meta.unbox(boxed)))
  ref = jax.jit(plain.apply)(params, pix)

  mesh = sharding.make_mesh(fsdp=4, tensor=2)
  shard = sharding.logical_shardings(boxed, mesh)
  q_spec = shard["params"]["encoder"]["layers"]["self_attn"]["q_proj"]["kernel"].spec
  assert tuple(q_spec) == (None, "fsdp", "tensor"), q_spec  # (layers, embed, heads)
  placed = jax.device_put(params, shard)
  remat = SiglipVisionTower(cfg, remat_policy="nothing_saveable")  # same params, rematerialised layers
  with sharding.in_mesh(mesh):
    out = jax.jit(remat.apply)(placed, jax.device_put(pix, sharding.batch_sharding(mesh, 4)))
  np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)
  assert float(jnp.abs(ref).max()) > 0.1
