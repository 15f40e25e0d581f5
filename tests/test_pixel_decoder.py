"""Mask2Former pixel decoder vs transformers' Mask2FormerPixelDecoder; HF/detectron2 name maps (CPU, float32)."""
import copy
import dataclasses
import pickle

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import Mask2FormerConfig, Mask2FormerModel, SwinConfig

from convert_fixtures import add_authors_fpn

from segearth_jax import presets, sharding, tensor_io
from segearth_jax.convert import name_map
from segearth_jax.convert.pixel_decoder_map import (
    HF_PREFIX, d2_pixel_decoder_to_hf, hf_pixel_decoder_to_d2, pixel_decoder_ignore, pixel_decoder_rules,
    with_fpn_biases)
from segearth_jax.errors import UserError
from segearth_jax.models.pixel_decoder import PixelDecoder, PixelDecoderConfig

BARE = "pixel_level_module.decoder."   # the prefix inside a bare Mask2FormerModel

CONFIGS = {
    # name: (Mask2FormerConfig kwargs, Swin embed_dim, backbone map sizes at strides 4/8/16/32, batch)
    "square": (dict(feature_size=64, mask_feature_size=64, encoder_layers=2, num_attention_heads=4,
                    encoder_feedforward_dim=128), 32, [(16, 16), (8, 8), (4, 4), (2, 2)], 2),
    # odd sizes: the stride-8 map is not half the stride-4 one, so upsampling is not a plain 2x
    "odd": (dict(feature_size=32, mask_feature_size=48, encoder_layers=1, num_attention_heads=2,
                 encoder_feedforward_dim=96), 16, [(13, 10), (7, 5), (4, 3), (2, 2)], 1),
}


def _hf_model(name):
  kw, embed, _, _ = CONFIGS[name]
  swin = SwinConfig(image_size=64, embed_dim=embed, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=2,
                    out_features=["stage1", "stage2", "stage3", "stage4"])
  cfg = Mask2FormerConfig(backbone_config=swin, hidden_dim=32, decoder_layers=1, dim_feedforward=32,
                          num_queries=3, **kw)
  torch.manual_seed(hash(name) % 1000)
  model = Mask2FormerModel(cfg).eval()
  decoder = model.pixel_level_module.decoder
  with torch.no_grad():   # random everything (GroupNorm/LayerNorm too) so a wrong mapping shows
    for n, p in decoder.named_parameters():
      if n.endswith("1.weight") or "norm" in n:
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      else:
        p.normal_(0.0, 0.25)
  return cfg, model


@pytest.fixture(scope="module", params=list(CONFIGS))
def case(request):
  name = request.param
  cfg, model = _hf_model(name)
  _, _, sizes, batch = CONFIGS[name]
  channels = model.pixel_level_module.encoder.channels
  rng = np.random.default_rng(0)
  feats = [rng.normal(size=(batch, h, w, c)).astype(np.float32) for (h, w), c in zip(sizes, channels)]
  sd = {k: v.numpy() for k, v in model.state_dict().items() if k.startswith(BARE)}
  return name, cfg, model, feats, sd


def _to_ours(sd, prefix=BARE, fpn="mask2former"):
  nm = name_map.NameMap(pixel_decoder_rules(prefix, fpn=fpn), pixel_decoder_ignore(prefix))
  return nm.to_ours(sd.keys(), sd.__getitem__)


def test_config_from_hf_and_presets(case):
  _, cfg, model, _, _ = case
  pc = PixelDecoderConfig.from_hf(cfg)
  assert pc.feature_channels == tuple(model.pixel_level_module.encoder.channels)
  assert (pc.feature_size, pc.encoder_layers, pc.num_attention_heads) == (
      cfg.feature_size, cfg.encoder_layers, cfg.num_attention_heads)
  assert pc.num_fpn_levels == 1
  tiny = PixelDecoderConfig.from_dict(presets.model_config("tiny").pixel_decoder, (32, 64, 128, 256))
  assert tiny.feature_size % 32 == 0 and tiny.encoder_layers == 2
  with pytest.raises(UserError, match="multiple of 32"):
    PixelDecoderConfig(feature_channels=(8, 16, 32, 64), feature_size=48)


def test_outputs_match_hf(case):
  name, cfg, model, feats, sd = case
  with torch.no_grad():
    want = model.pixel_level_module.decoder([torch.tensor(f).permute(0, 3, 1, 2) for f in feats])
  params = _to_ours(sd)
  mod = PixelDecoder(PixelDecoderConfig.from_hf(cfg))
  mask, multi = jax.jit(mod.apply)({"params": params}, feats)
  sizes = CONFIGS[name][2]
  assert mask.shape == (feats[0].shape[0], *sizes[0], cfg.mask_feature_size)
  assert [m.shape[1:3] for m in multi] == [sizes[3], sizes[2], sizes[1]]   # stride 32, 16, 8 as HF
  pairs = [(mask, want.mask_features)] + list(zip(multi, want.multi_scale_features))
  assert len(pairs) == 4
  for got, ref in pairs:
    ref = ref.permute(0, 2, 3, 1).numpy()
    assert got.shape == ref.shape
    assert np.abs(np.asarray(got) - ref).max() <= 1e-4, name


def test_authors_fpn_matches_reference(case):
  """fpn='authors' vs transformers' pixel decoder with the FPN conv biases (non-zero) and the lateral ReLU
  added in the test (convert_fixtures.add_authors_fpn): every output <= 1e-4; the param tree is the
  module's, and the default rules, which have no FPN bias, reject the biased checkpoint."""
  name, cfg, model, feats, _ = case
  ref = copy.deepcopy(model)
  decoder = ref.pixel_level_module.decoder
  add_authors_fpn(decoder, seed=3)
  assert isinstance(decoder.adapter_1[-1], torch.nn.ReLU) and decoder.layer_1[0].bias.abs().min() > 0
  with torch.no_grad():
    want = decoder([torch.tensor(f).permute(0, 3, 1, 2) for f in feats])
  sd = {k: v.detach().numpy() for k, v in ref.state_dict().items() if k.startswith(BARE)}
  assert BARE + "adapter_1.0.bias" in sd and BARE + "layer_1.0.bias" in sd
  params = _to_ours(sd, fpn="authors")
  pc = dataclasses.replace(PixelDecoderConfig.from_hf(cfg), fpn="authors")
  mod = PixelDecoder(pc)
  abstract = jax.eval_shape(lambda: nn.meta.unbox(mod.init(jax.random.key(0), feats)["params"]))
  assert {k: v.shape for k, v in tensor_io.flatten(params).items()} == \
      {k: v.shape for k, v in tensor_io.flatten(abstract).items()}
  mask, multi = jax.jit(mod.apply)({"params": params}, feats)
  for got, r in [(mask, want.mask_features)] + list(zip(multi, want.multi_scale_features)):
    assert np.abs(np.asarray(got) - r.permute(0, 2, 3, 1).numpy()).max() <= 1e-4, name
  # the variant matters: the same params without the lateral ReLU (and biases) give other mask features
  plain = {k: v.numpy() for k, v in model.state_dict().items() if k.startswith(BARE)}
  other, _ = jax.jit(PixelDecoder(PixelDecoderConfig.from_hf(cfg)).apply)({"params": _to_ours(plain)}, feats)
  assert np.abs(np.asarray(other) - np.asarray(mask)).max() > 1e-2
  with pytest.raises(UserError, match=r"adapter_1\.0\.bias|layer_1\.0\.bias"):
    _to_ours(sd)
  # a bias-free (transformers / detectron2) import made 'authors': zero biases, the module's tree
  zero = with_fpn_biases(_to_ours(plain), "authors")
  assert {k: v.shape for k, v in tensor_io.flatten(zero).items()} == \
      {k: v.shape for k, v in tensor_io.flatten(abstract).items()}
  assert all(np.all(zero[n]["conv"]["bias"] == 0) for n in ("adapter_1", "layer_1"))
  assert with_fpn_biases(_to_ours(plain), "mask2former").keys() == _to_ours(plain).keys()
  with pytest.raises(UserError, match="fpn"):
    PixelDecoderConfig(feature_channels=(32, 64, 128, 256), fpn="detectron2")


def test_param_tree_matches_init(case):
  """The converted tree has exactly the params (and shapes) our module creates."""
  _, cfg, _, feats, sd = case
  mod = PixelDecoder(PixelDecoderConfig.from_hf(cfg))
  abstract = jax.eval_shape(lambda: nn.meta.unbox(mod.init(jax.random.key(0), feats)["params"]))
  got = {k: v.shape for k, v in tensor_io.flatten(_to_ours(sd)).items()}
  assert got == {k: v.shape for k, v in tensor_io.flatten(abstract).items()}


def test_hf_roundtrip_bit_exact(case):
  _, _, _, _, sd = case
  full = {"model." + k: v for k, v in sd.items()}   # Mask2FormerForUniversalSegmentation naming
  nm = name_map.NameMap(pixel_decoder_rules(HF_PREFIX, ours_prefix="pixel_decoder/"))
  ours = nm.to_ours(full.keys(), full.__getitem__)
  assert set(ours) == {"pixel_decoder"}
  back = dict(nm.to_theirs(ours))
  assert back.keys() == full.keys()
  for k, v in full.items():
    assert back[k].dtype == v.dtype and np.array_equal(back[k], v), k


def test_detectron2_pickle_imports_to_same_params(case, tmp_path):
  _, _, _, _, sd = case
  hf_state = {"model." + k: v for k, v in sd.items()}
  d2 = hf_pixel_decoder_to_d2(hf_state)
  # the real detectron2 names (facebookresearch/Mask2Former msdeformattn.py)
  for key in ("input_proj.0.0.weight", "input_proj.2.1.bias", "transformer.level_embed",
              "transformer.encoder.layers.0.self_attn.sampling_offsets.weight",
              "transformer.encoder.layers.0.norm1.weight", "transformer.encoder.layers.0.linear2.bias",
              "transformer.encoder.layers.0.norm2.bias", "adapter_1.weight", "adapter_1.norm.weight",
              "layer_1.weight", "layer_1.norm.bias", "mask_features.weight", "mask_features.bias"):
    assert "sem_seg_head.pixel_decoder." + key in d2, key
  path = tmp_path / "model_final.pkl"
  backbone = {"backbone.patch_embed.proj.weight": np.zeros((4, 3, 4, 4), np.float32)}
  with open(path, "wb") as f:
    pickle.dump({"model": {**d2, **backbone}, "__author__": "test"}, f)
  with open(path, "rb") as f:
    loaded = pickle.load(f)
  hf_again = d2_pixel_decoder_to_hf(loaded)
  assert hf_again.keys() == hf_state.keys()
  ours_d2 = _to_ours(hf_again, HF_PREFIX)
  ours_hf = _to_ours(sd)
  flat_a, flat_b = tensor_io.flatten(ours_d2), tensor_io.flatten(ours_hf)
  assert flat_a.keys() == flat_b.keys()
  for k in flat_a:
    assert np.array_equal(flat_a[k], flat_b[k]), k
  with pytest.raises(UserError, match="no mapping"):
    d2_pixel_decoder_to_hf({"sem_seg_head.pixel_decoder.mystery.weight": np.zeros(1)})


@pytest.mark.parametrize("mesh_kw", [dict(data=8), dict(fsdp=4, tensor=2)])
def test_sharded_equals_unsharded(mesh_kw):
  cfg, model = _hf_model("square")
  sizes = CONFIGS["square"][2]
  channels = model.pixel_level_module.encoder.channels
  rng = np.random.default_rng(1)
  feats = [rng.normal(size=(8, h, w, c)).astype(np.float32) for (h, w), c in zip(sizes, channels)]
  params = _to_ours({k: v.numpy() for k, v in model.state_dict().items() if k.startswith(BARE)})
  mod = PixelDecoder(PixelDecoderConfig.from_hf(cfg))
  want = jax.jit(mod.apply)({"params": params}, feats)

  mesh = sharding.make_mesh(**mesh_kw)
  boxed = jax.eval_shape(lambda: mod.init(jax.random.key(0), feats))
  p_shard = sharding.logical_shardings(boxed, mesh)["params"]
  f_shard = [sharding.batch_sharding(mesh, 4) for _ in feats]
  with sharding.in_mesh(mesh):
    fn = jax.jit(lambda p, f: mod.apply({"params": p}, f), in_shardings=(p_shard, f_shard))
    got = fn(jax.device_put(params, p_shard), [jax.device_put(f, s) for f, s in zip(feats, f_shard)])
  assert len(got[0].sharding.device_set) == 8
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert np.abs(np.asarray(g) - np.asarray(w)).max() <= 1e-5


def test_paper_config_shapes():
  """presets 'mipha3b' pixel decoder on Swin-B maps of a 1024 image: traced only, never run."""
  pc = PixelDecoderConfig.from_dict(presets.model_config("mipha3b").pixel_decoder, (128, 256, 512, 1024))
  feats = [jax.ShapeDtypeStruct((1, 1024 // s, 1024 // s, c), jnp.float32)
           for s, c in zip((4, 8, 16, 32), (128, 256, 512, 1024))]
  mod = PixelDecoder(pc)
  variables = jax.eval_shape(lambda f: mod.init(jax.random.key(0), f), feats)
  mask, multi = jax.eval_shape(lambda v, f: mod.apply(v, f), variables, feats)
  assert mask.shape == (1, 256, 256, 256)
  assert [m.shape for m in multi] == [(1, 32, 32, 256), (1, 64, 64, 256), (1, 128, 128, 256)]
  params = nn.meta.unbox(variables["params"])
  assert params["encoder"]["self_attn"]["sampling_offsets"]["kernel"].shape == (6, 256, 8 * 3 * 4 * 2)
  assert params["encoder"]["fc1"]["kernel"].shape == (6, 256, 1024)


def test_bfloat16_remat_trains():
  """bf16 compute with per-layer remat: close to float32 forward, finite gradients for every param."""
  cfg, model = _hf_model("odd")
  sizes = CONFIGS["odd"][2]
  rng = np.random.default_rng(2)
  feats = [rng.normal(size=(1, h, w, c)).astype(np.float32)
           for (h, w), c in zip(sizes, model.pixel_level_module.encoder.channels)]
  params = _to_ours({k: v.numpy() for k, v in model.state_dict().items() if k.startswith(BARE)})
  pc = PixelDecoderConfig.from_hf(cfg)
  ref, _ = jax.jit(PixelDecoder(pc).apply)({"params": params}, feats)
  mod = PixelDecoder(pc, dtype="bfloat16", remat_policy="nothing_saveable")

  def loss(p):
    mask, multi = mod.apply({"params": p}, feats)
    return jnp.mean(mask.astype(jnp.float32) ** 2) + sum(jnp.mean(m.astype(jnp.float32)) for m in multi), mask

  (_, mask), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  assert mask.dtype == jnp.bfloat16
  assert np.abs(np.asarray(mask, np.float32) - np.asarray(ref)).max() <= 0.05 * np.abs(np.asarray(ref)).max()
  leaves = jax.tree.leaves(grads)
  assert all(np.isfinite(np.asarray(g)).all() for g in leaves)
  assert np.abs(np.asarray(grads["encoder"]["self_attn"]["sampling_offsets"]["kernel"])).max() > 0
