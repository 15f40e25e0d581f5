"""Whole-Mask2Former conversion (HF <-> ours, detectron2 -> ours) and the assembled MaskHead."""
import pickle
import re

import jax
import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, Mask2FormerModel, SwinConfig

from convert_fixtures import hf_decoder_to_d2

from segearth_jax.convert.mask2former import export_mask2former, import_mask2former
from segearth_jax.convert.pixel_decoder_map import hf_pixel_decoder_to_d2
from segearth_jax.errors import UserError
from segearth_jax.models.mask_decoder import MaskDecoderConfig
from segearth_jax.models.mask_head import MaskHead
from segearth_jax.models.pixel_decoder import PixelDecoderConfig
from segearth_jax.models.swin import SwinConfig as OurSwinConfig
from segearth_jax import sharding

IMG = 64


def _hf_config(hidden_dim, num_queries=3):
  sc = SwinConfig(image_size=IMG, embed_dim=16, depths=[1, 2, 1, 1], num_heads=[1, 2, 2, 2], window_size=4,
                  out_features=["stage1", "stage2", "stage3", "stage4"], drop_path_rate=0.0)
  return Mask2FormerConfig(backbone_config=sc, feature_size=32, mask_feature_size=32, hidden_dim=hidden_dim,
                           encoder_feedforward_dim=48, encoder_layers=2, decoder_layers=5, num_attention_heads=2,
                           dim_feedforward=40, num_queries=num_queries)


def _randomise(model):
  torch.manual_seed(0)
  with torch.no_grad():   # every tensor distinct and non-trivial, so a swapped key cannot go unnoticed
    for _, p in model.named_parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model.eval()


def _safetensors(path):
  with safe_open(path, "np") as f:
    return {k: f.get_tensor(k) for k in f.keys()}


def _flat(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}/"))
    else:
      out[prefix + k] = np.asarray(v)
  return out


# ------------------------------------------------------------------ HF -> ours -> HF
def test_hf_roundtrip_bit_exact_and_loads(tmp_path):
  cfg = _hf_config(hidden_dim=24)                  # 24 != 32: the transformer module has input projections
  hf = _randomise(Mask2FormerModel(cfg))
  hf.save_pretrained(tmp_path / "hf")
  params = import_mask2former(str(tmp_path / "hf"))
  assert set(params) == {"swin", "pixel_decoder", "mask_decoder"}
  assert "input_proj_2" in params["mask_decoder"] and "layers_3" in params["mask_decoder"]
  export_mask2former(params, str(tmp_path / "out"), cfg)
  a = _safetensors(tmp_path / "hf" / "model.safetensors")
  b = _safetensors(tmp_path / "out" / "model.safetensors")
  assert set(a) == set(b)
  unused = {"transformer_module.queries_features.weight", "transformer_module.queries_embedder.weight"}
  for k in a:
    if k in unused:
      assert b[k].shape == a[k].shape and not b[k].any()
    elif k.startswith("pixel_level_module.encoder.swin.layernorm."):   # never applied by the backbone
      assert b[k].shape == a[k].shape and (b[k] == (1.0 if k.endswith("weight") else 0.0)).all()
    else:
      assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
  back, info = Mask2FormerModel.from_pretrained(str(tmp_path / "out"), output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
  sd0, sd1 = hf.state_dict(), back.state_dict()
  for k in sd0:
    if "queries" not in k and ".swin.layernorm." not in k:
      assert torch.equal(sd0[k], sd1[k]), k


# ------------------------------------------------------------------ detectron2 pickle
def _hf_to_d2(hf_sd):
  """Test helper: HF Mask2FormerForUniversalSegmentation (saved layout) -> detectron2 names."""
  d2 = hf_pixel_decoder_to_d2({k: v for k, v in hf_sd.items() if ".pixel_level_module.decoder." in k},
                              hf_prefix="model.pixel_level_module.decoder.")
  inv_block = {"layernorm_before": "norm1", "layernorm_after": "norm2", "attention.output.dense": "attn.proj",
               "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2"}
  qkv = {}
  for k, v in hf_sd.items():
    if k.startswith("model.pixel_level_module.encoder."):
      r = k[len("model.pixel_level_module.encoder."):]
      if r.startswith("swin.layernorm."):     # HF-only, unused: detectron2's Swin has no final norm
        continue
      if m := re.fullmatch(r"embeddings\.patch_embeddings\.projection\.(\w+)", r):
        d2[f"backbone.patch_embed.proj.{m[1]}"] = v
      elif m := re.fullmatch(r"embeddings\.norm\.(\w+)", r):
        d2[f"backbone.patch_embed.norm.{m[1]}"] = v
      elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.attention\.self\.(query|key|value)\.(\w+)", r):
        qkv.setdefault(f"backbone.layers.{m[1]}.blocks.{m[2]}.attn.qkv.{m[4]}", {})[m[3]] = v
      elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.attention\.self\.relative_position_bias_table", r):
        d2[f"backbone.layers.{m[1]}.blocks.{m[2]}.attn.relative_position_bias_table"] = v
      elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.(.+)\.(weight|bias)", r):
        d2[f"backbone.layers.{m[1]}.blocks.{m[2]}.{inv_block[m[3]]}.{m[4]}"] = v
      elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.downsample\.(.+)", r):
        d2[f"backbone.layers.{m[1]}.downsample.{m[2]}"] = v
      elif m := re.fullmatch(r"hidden_states_norms\.stage(\d+)\.(\w+)", r):
        d2[f"backbone.norm{int(m[1]) - 1}.{m[2]}"] = v
      else:
        raise AssertionError(k)
    elif k.startswith("class_predictor."):
      d2["sem_seg_head.predictor.class_embed." + k.split(".", 1)[1]] = v
    elif k == "criterion.empty_weight":
      d2[k] = v
  for k, parts in qkv.items():
    d2[k] = np.concatenate([parts["query"], parts["key"], parts["value"]], 0)
  decoder = {k[len("model.transformer_module."):]: v for k, v in hf_sd.items()
             if k.startswith("model.transformer_module.")}
  d2 |= {"sem_seg_head.predictor." + k: v for k, v in hf_decoder_to_d2(decoder).items()}
  return d2


def test_d2_pickle_imports_like_its_hf_twin(tmp_path):
  cfg = _hf_config(hidden_dim=32)
  hf = _randomise(Mask2FormerForUniversalSegmentation(cfg))
  hf.save_pretrained(tmp_path / "hf")
  sd = _safetensors(tmp_path / "hf" / "model.safetensors")
  ours_hf = import_mask2former(str(tmp_path / "hf"))
  d2 = _hf_to_d2(sd)
  assert any(k.endswith("attn.qkv.weight") for k in d2) and "sem_seg_head.predictor.decoder_norm.weight" in d2
  with open(tmp_path / "m2f.pkl", "wb") as f:
    pickle.dump({"model": d2, "__author__": "test", "matching_heuristics": True}, f)
  ours_d2 = import_mask2former(str(tmp_path / "m2f.pkl"))
  fa, fb = _flat(ours_hf), _flat(ours_d2)
  assert set(fa) == set(fb)
  for k in fa:
    assert fa[k].dtype == fb[k].dtype and np.array_equal(fa[k], fb[k]), k

  class Evil:
    def __reduce__(self):
      return (print, ("pwned",))
  with open(tmp_path / "evil.pkl", "wb") as f:
    pickle.dump({"model": {"x": Evil()}}, f)
  with pytest.raises(UserError, match="not allowed"):
    import_mask2former(str(tmp_path / "evil.pkl"))


# ------------------------------------------------------------------ the assembled head
def _head(cfg):
  swin = OurSwinConfig.from_hf(cfg)
  return MaskHead(swin, PixelDecoderConfig.from_hf(cfg), MaskDecoderConfig.from_hf(cfg))


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
  cfg = _hf_config(hidden_dim=24, num_queries=1)   # one HF query = one [SEG] decoded alone
  hf = _randomise(Mask2FormerModel(cfg))
  d = tmp_path_factory.mktemp("m2f")
  hf.save_pretrained(d)
  return cfg, hf, import_mask2former(str(d))


def test_head_matches_hf_and_runs_sharded(imported):
  """One batch through the head unsharded and on the 8-device mesh (data 2 x fsdp 2 x tensor 2); every
  real [SEG] slot equals HF Mask2FormerModel decoding that query alone (HF's own self-attention over a
  single query is the identity mask), padded slots are 0."""
  cfg, hf, params = imported
  head = _head(cfg)
  b, k = 4, 2
  rng = np.random.default_rng(1)
  img = rng.normal(size=(b, IMG, IMG, 3)).astype(np.float32)
  q = rng.normal(size=(b, k, cfg.hidden_dim)).astype(np.float32)
  valid = np.array([[1, 1], [1, 0], [0, 1], [1, 1]], bool)
  fwd = lambda p, x, qq, v: head.apply({"params": p}, x, qq, v)
  ref = np.asarray(jax.jit(fwd)(params, img, q, valid))
  assert ref.shape == (cfg.decoder_layers, b, k, IMG // 4, IMG // 4)

  for bi, j in zip(*np.nonzero(valid)):
    with torch.no_grad():
      hf.transformer_module.queries_features.weight.copy_(torch.from_numpy(q[bi, j:j + 1]))
      hf.transformer_module.queries_embedder.weight.zero_()
      out = hf(torch.from_numpy(img[bi:bi + 1]).permute(0, 3, 1, 2))
    hf_logits = np.stack([m[0, 0].numpy() for m in out.masks_queries_logits])
    np.testing.assert_allclose(ref[:, bi, j], hf_logits, atol=1e-3, rtol=0)
  assert (ref[:, ~valid] == 0).all()

  boxed = jax.eval_shape(head.init, jax.random.key(0), img[:1], q[:1], valid[:1])["params"]
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  p_sh = sharding.logical_shardings(boxed, mesh)
  in_sh = (p_sh, sharding.batch_sharding(mesh, 4), sharding.batch_sharding(mesh, 3),
           sharding.batch_sharding(mesh, 2))
  with sharding.in_mesh(mesh):
    args = [jax.device_put(x, s) for x, s in zip((params, img, q, valid), in_sh)]
    out = jax.jit(fwd, in_shardings=in_sh)(*args)
  assert len(out.sharding.device_set) == 8
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5, rtol=0)
