"""ModelConfig: one strict from_dict for the whole model config and each part, built once by build_model;
scan_layers=False gives per-layer param names everywhere (the Swin included) and the same forward."""
import dataclasses
import json

import flax.linen as nn
import jax
import numpy as np
import pytest

from segearth_jax import presets
from segearth_jax.errors import UserError
from segearth_jax.models.layers import activation, remat_policy
from segearth_jax.models.lora import LoraConfig
from segearth_jax.models.mask_decoder import MaskDecoderConfig
from segearth_jax.models.phi import PhiConfig
from segearth_jax.models.pixel_decoder import PixelDecoderConfig
from segearth_jax.models.segearth import ModelConfig, SegEarthR2, build_model
from segearth_jax.models.siglip import SiglipConfig
from segearth_jax.models.swin import SwinConfig

PARTS = ["vision", "llm", "lora", "swin", "pixel_decoder", "mask_decoder"]


@pytest.mark.parametrize("part", PARTS)
def test_unknown_part_field_is_named(part):
  cfg = presets.model_config("tiny")
  cfg[part]["hiden_size"] = 1
  with pytest.raises(UserError, match=f"^model.{part}: unknown field 'hiden_size'"):
    ModelConfig.from_dict(cfg)


def test_unknown_top_level_field_is_named():
  cfg = presets.model_config("tiny").to_dict()
  cfg["scan_layer"] = False
  with pytest.raises(UserError, match="^model: unknown field 'scan_layer'"):
    ModelConfig.from_dict(cfg)


@pytest.mark.parametrize("make,part", [
    (lambda d: SiglipConfig.from_dict(d), "vision"), (lambda d: PhiConfig.from_dict(d), "llm"),
    (lambda d: LoraConfig.from_dict(d), "lora"), (lambda d: SwinConfig.from_dict(d), "swin"),
    (lambda d: PixelDecoderConfig.from_dict(d, (32, 64, 128, 256)), "pixel_decoder"),
    (lambda d: MaskDecoderConfig.from_dict(d), "mask_decoder")])
def test_each_part_from_dict_is_strict_and_defaults_the_rest(make, part):
  with pytest.raises(UserError, match=f"^model.{part}: unknown field 'foo'"):
    make({"foo": 1})
  base = make({})
  assert make(dataclasses.asdict(base) if part != "pixel_decoder" else {}) == base
  if part != "pixel_decoder":
    assert base == type(base)()   # missing fields: the dataclass defaults, nothing else


def test_derived_pixel_decoder_channels_are_refused():
  cfg = presets.model_config("tiny")
  cfg.pixel_decoder.feature_channels = (1, 2, 3, 4)
  with pytest.raises(UserError, match="model.pixel_decoder: field 'feature_channels' is derived"):
    ModelConfig.from_dict(cfg)


def test_presets_and_defaults():
  tiny = ModelConfig.from_dict(presets.model_config("tiny"))
  assert isinstance(tiny.swin, SwinConfig) and tiny.swin.depths == (2, 2, 2, 2)
  assert tiny.pixel_decoder.feature_channels == tiny.swin.dims == (32, 64, 128, 256)
  assert tiny.lora == LoraConfig(rank=8, alpha=16.0, dropout=0.05, targets=("q_proj", "v_proj"))
  assert tiny.dtype == "float32" and tiny.scan_layers is True
  hash(tiny)   # a flax module attribute
  # JSON (lists for tuples) reads back to the same config
  assert ModelConfig.from_dict(json.loads(json.dumps(presets.model_config("tiny").to_dict()))) == tiny
  # the dataclass defaults are the paper preset; an empty mapping is all defaults
  assert ModelConfig.from_dict(presets.model_config("mipha3b")) == ModelConfig() == ModelConfig.from_dict({})
  assert presets.image_tokens(tiny) == presets.image_tokens(presets.model_config("tiny")) == 64


def test_lora_rank_zero_or_none_is_no_lora():
  cfg = presets.model_config("tiny")
  cfg.lora.rank = 0
  assert ModelConfig.from_dict(cfg).lora is None
  d = presets.model_config("tiny").to_dict()
  d["lora"] = None
  assert ModelConfig.from_dict(d).lora is None
  with pytest.raises(UserError, match="rank"):
    LoraConfig(rank=0)


@pytest.mark.parametrize("field,value,match", [
    ("attention_impl", "flash", "model.attention_impl='flash'"),
    ("dtype", "float64", "model.dtype: dtype 'float64'"),
    ("remat_policy", "some", "remat_policy='some'"),
    ("projector_hidden_act", "tanh", "hidden_act='tanh'"),
    ("max_seg", 0, "model.max_seg=0")])
def test_bad_values_are_user_errors(field, value, match):
  cfg = presets.model_config("tiny").to_dict()
  cfg[field] = value
  with pytest.raises(UserError, match=match):
    ModelConfig.from_dict(cfg)


def test_layer_tables_name_the_known_choices():
  with pytest.raises(UserError, match="known: .*'gelu_pytorch_tanh'.*'quick_gelu'.*'swish'"):
    activation("gelu_tanh")
  assert remat_policy("none") is None and remat_policy("dots_saveable") is jax.checkpoint_policies.dots_saveable
  x = np.linspace(-3, 3, 7, dtype=np.float32)
  np.testing.assert_allclose(activation("gelu_new")(x), activation("gelu_pytorch_tanh")(x))
  assert np.abs(np.asarray(activation("gelu")(x) - activation("gelu_new")(x))).max() > 1e-5


def test_build_model_takes_a_configdict_or_a_modelconfig():
  cd = presets.model_config("tiny")
  a, b = build_model(cd, vocab_size=1030), build_model(ModelConfig.from_dict(cd), vocab_size=1030)
  assert isinstance(a, SegEarthR2) and a.config == b.config
  assert a.config.llm.vocab_size == 1088          # grown to a multiple of 64
  assert build_model(cd, vocab_size=10).config.llm.vocab_size == 1024   # never shrunk
  assert build_model(cd).config == ModelConfig.from_dict(cd)


# ------------------------------------------------------------------------- scan_layers=False
def _batch(cfg: ModelConfig, length: int = 24):
  rng = np.random.default_rng(0)
  s, w = cfg.vision.image_size, cfg.swin.image_size
  k = cfg.max_seg
  return dict(
      siglip_image=rng.standard_normal((1, s, s, 3)).astype(np.float32),
      swin_image=rng.standard_normal((1, w, w, 3)).astype(np.float32),
      input_ids=rng.integers(0, cfg.llm.vocab_size, (1, length)).astype(np.int32),
      attention_mask=np.ones((1, length), np.int32),
      image_start=np.array([2], np.int32),
      seg_positions=np.array([[length - 3, length - 1] + [0] * (k - 2)], np.int32),
      seg_valid=np.array([[True] * 2 + [False] * (k - 2)]))


def _unstack_like(scanned, target):
  """Split every stacked 'layers' / 'blocks' subtree of ``scanned`` into the ``{name}_{i}`` of ``target``."""
  if not isinstance(scanned, dict):
    return scanned
  out = {}
  for key, value in scanned.items():
    if key not in target and f"{key}_0" in target:
      n = len([t for t in target if t.startswith(f"{key}_")])
      for i in range(n):
        out[f"{key}_{i}"] = jax.tree.map(lambda x, i=i: x[i], value)
    else:
      out[key] = _unstack_like(value, target[key])
  return out


def test_scan_layers_false_unstacks_every_tower_and_computes_the_same():
  cd = presets.model_config("tiny")
  cd.remat_policy = "none"
  # smaller still where layer stacking plays no part (compile time); every stack keeps >= 2 layers
  cd.vision.image_size, cd.vision.num_hidden_layers = 56, 2
  cd.swin.image_size = 64
  cd.pixel_decoder.encoder_layers, cd.mask_decoder.num_layers, cd.max_seg = 1, 1, 2
  scanned, looped = build_model(cd), build_model(dict(cd.to_dict(), scan_layers=False))
  assert looped.config.scan_layers is False and looped.config.swin == scanned.config.swin
  batch = _batch(scanned.config)
  tree = lambda model: nn.unbox(jax.eval_shape(lambda k: model.init(k, batch), jax.random.key(0))["params"])
  rng = np.random.default_rng(1)   # random values, not model.init: compiling init costs more than the test
  params = jax.tree.map(lambda x: (0.1 * rng.standard_normal(x.shape)).astype(x.dtype), tree(scanned))
  assert set(params) == {"vision", "projector", "llm", "seg_projector", "mask_head"}
  shapes = tree(looped)

  swin = shapes["mask_head"]["swin"]
  for i, depth in enumerate(scanned.config.swin.depths):
    assert {f"blocks_{j}" for j in range(depth)} <= set(swin[f"stage{i}"]) and "blocks" not in swin[f"stage{i}"]
  assert "layers_1" in shapes["vision"]["encoder"] and "layers_1" in shapes["llm"]
  assert params["mask_head"]["swin"]["stage0"]["blocks"]["fc1"]["kernel"].shape[0] == 2

  unstacked = _unstack_like(params, shapes)
  same = jax.tree.map(lambda a, b: a.shape == b.shape and a.dtype == b.dtype, unstacked, shapes)
  assert all(jax.tree.leaves(same))                 # raises on any difference in tree structure

  want = jax.jit(scanned.apply)({"params": params}, batch)
  got = jax.jit(looped.apply)({"params": unstacked}, batch)
  for key in ("logits", "seg_attn", "mask_logits"):
    w, g = np.asarray(want[key]), np.asarray(got[key])
    assert w.shape == g.shape and np.abs(w).max() > 0
    np.testing.assert_allclose(g, w, atol=2e-5, rtol=1e-5, err_msg=key)
