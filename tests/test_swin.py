"""Swin backbone: parity with transformers' SwinBackbone (as Mask2Former uses it), conversion both
ways (HF saved + module layouts, detectron2 pickle), sharding, and the Swin-B shapes at 1024."""
import pickle
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from segearth_jax import presets, sharding, tensor_io
from segearth_jax.convert.swin_map import (M2F_PREFIX, d2_swin_to_hf, export_swin, import_swin,
                                           save_swin_backbone, swin_ignore, swin_layout)
from segearth_jax.errors import UserError
from segearth_jax.models.swin import SwinBackbone, SwinConfig

STAGES = ["stage1", "stage2", "stage3", "stage4"]
# set 1: as in Mask2Former, every size a multiple of the window
SET1 = dict(image_size=64, embed_dim=16, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4], window_size=4)
# set 2: odd depths, window 7 > stage-3/4 resolution (padding + shift mask on a padded map), odd
# size before a patch merge, and a non-square input that is not a multiple of the patch size
SET2 = dict(image_size=56, embed_dim=16, depths=[1, 2, 3, 1], num_heads=[1, 2, 2, 4], window_size=7)


def _perturb(module, seed):
  # HF inits bias tables to 0 and norms to 1/0: randomise everything so each weight matters
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for _, p in module.named_parameters():
      p.add_(torch.randn(p.shape, generator=g) * 0.1)


def _nhwc(x):
  return jnp.asarray(x.numpy().transpose(0, 2, 3, 1))


def _check_features(outs, ref, cfg, hw):
  shapes = cfg.feature_shapes(*hw)
  assert len(outs) == len(ref) == 4
  for i, (o, r) in enumerate(zip(outs, ref)):
    assert o.shape[1:] == shapes[i], (i, o.shape, shapes[i])
    diff = np.abs(np.asarray(o).transpose(0, 3, 1, 2) - r.numpy()).max()
    assert diff <= 1e-4, f"stage {i + 1}: max abs diff {diff}"


@pytest.fixture(scope="module")
def m2f(tmp_path_factory):
  """A tiny Mask2FormerForUniversalSegmentation with a Swin backbone, saved with save_pretrained."""
  from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation
  from transformers import SwinConfig as HFSwinConfig

  hc = Mask2FormerConfig(backbone_config=HFSwinConfig(**SET1, out_features=STAGES), feature_size=32,
                         mask_feature_size=32, hidden_dim=32, encoder_feedforward_dim=32,
                         dim_feedforward=32, decoder_layers=2, encoder_layers=1, num_queries=3)
  model = Mask2FormerForUniversalSegmentation(hc).eval()
  _perturb(model.model.pixel_level_module.encoder, 0)
  path = tmp_path_factory.mktemp("m2f")
  model.save_pretrained(path)
  x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))  # 4: data x fsdp below
  with torch.no_grad():
    ref = model.model.pixel_level_module.encoder(x).feature_maps
  return dict(hf_config=hc, model=model, path=path, x=x, ref=ref)


@pytest.fixture(scope="module")
def standalone():
  """A standalone HF SwinBackbone (set 2); weights are read from its module state_dict."""
  from transformers import SwinBackbone as HFSwinBackbone
  from transformers import SwinConfig as HFSwinConfig

  hc = HFSwinConfig(**SET2, out_features=STAGES)
  model = HFSwinBackbone(hc).eval()
  _perturb(model, 2)
  x = torch.randn(2, 3, 58, 54, generator=torch.Generator().manual_seed(3))
  with torch.no_grad():
    ref = model(x).feature_maps
  return dict(hf_config=hc, model=model, x=x, ref=ref)


@pytest.fixture(scope="module")
def m2f_ours(m2f):
  """Our unsharded output on set 1, weights from the saved safetensors (one compile, shared)."""
  cfg = SwinConfig.from_hf(m2f["hf_config"])
  params = import_swin(str(m2f["path"]))
  outs = jax.jit(SwinBackbone(cfg).apply)({"params": params}, _nhwc(m2f["x"]))
  return dict(config=cfg, params=params, outs=outs)


# ------------------------------------------------------------------------------------------- parity
def test_parity_mask2former_checkpoint(m2f, m2f_ours):
  """Set 1: weights from the saved Mask2Former safetensors (legacy names, default prefix)."""
  cfg = m2f_ours["config"]
  assert cfg.depths == (2, 2, 2, 2) and cfg.window_size == 4
  lay = swin_layout(tensor_io.SafetensorsReader(str(m2f["path"])).keys())
  assert lay == dict(prefix=M2F_PREFIX, body="", legacy=True, stage_norms=True)
  _check_features(m2f_ours["outs"], m2f["ref"], cfg, (64, 64))


def test_parity_standalone_padded(standalone):
  """Set 2: weights from the module state_dict (q_proj/o_proj/mlp names, `swin.` level)."""
  cfg = SwinConfig.from_hf(standalone["hf_config"])
  sd = standalone["model"].state_dict()
  assert swin_layout(sd.keys()) == dict(prefix="", body="swin.", legacy=False, stage_norms=True)
  x = _nhwc(standalone["x"])
  params = import_swin(sd)
  outs = jax.jit(SwinBackbone(cfg).apply)({"params": params}, x)
  _check_features(outs, standalone["ref"], cfg, (58, 54))
  assert [o.shape[1:3] for o in outs] == [(15, 14), (8, 7), (4, 4), (2, 2)]
  # the unscanned layout (blocks_{j}) has the same tree as the module builds and converts back
  flat = tensor_io.flatten(import_swin(sd, scan_layers=False))
  init = jax.eval_shape(SwinBackbone(cfg, scan_layers=False).init, jax.random.key(0), x)
  want = tensor_io.flatten(nn.meta.unbox(init)["params"])
  assert {k: v.shape for k, v in flat.items()} == {k: v.shape for k, v in want.items()}
  assert "stage2/blocks_2/attention/query/kernel" in flat
  np.testing.assert_array_equal(flat["stage2/blocks_1/fc1/kernel"],
                                tensor_io.flatten(params)["stage2/blocks/fc1/kernel"][1])


# --------------------------------------------------------------------------------------- conversion
def _hf_tensors(path):
  r = tensor_io.SafetensorsReader(str(path))
  return {k: r.get(k) for k in r.keys() if k.startswith(M2F_PREFIX)}


def _not_ignored(keys, prefix):
  return {k for k in keys if not any(re.fullmatch(p, k) for p in swin_ignore(prefix))}


def test_roundtrip_bit_exact(m2f, standalone):
  # saved layout inside a Mask2Former checkpoint
  hf = _hf_tensors(m2f["path"])
  back = export_swin(import_swin(str(m2f["path"])))
  assert set(back) == _not_ignored(hf, M2F_PREFIX)
  assert any("swin.layernorm" in k for k in hf)  # the only dropped key: SwinModel's unused final norm
  for k, v in back.items():
    assert v.dtype == hf[k].dtype and v.shape == hf[k].shape and np.array_equal(v, hf[k]), k
  # module layout of a standalone SwinBackbone state_dict
  sd = {k: v.numpy() for k, v in standalone["model"].state_dict().items()}
  back = export_swin(import_swin(sd), "", legacy=False)
  assert set(back) == _not_ignored(sd, "")
  for k, v in back.items():
    assert np.array_equal(v, sd[k]), k


def _hf_to_d2(hf, prefix):
  """What a detectron2 Mask2Former Swin checkpoint holds, built from HF saved-layout tensors."""
  d2 = {}
  blk = re.compile(re.escape(prefix) + r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.(.*)")
  ren = {"layernorm_before": "norm1", "layernorm_after": "norm2", "attention.output.dense": "attn.proj",
         "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2"}
  for k, v in hf.items():
    rest = k[len(prefix):]
    if m := blk.fullmatch(k):
      s, j, tail = m.groups()
      b = f"backbone.layers.{s}.blocks.{j}."
      if tail.startswith("attention.self.query."):
        w = tail.rsplit(".", 1)[1]
        qkv = [hf[k.replace("self.query.", f"self.{n}.")] for n in ("query", "key", "value")]
        d2[b + f"attn.qkv.{w}"] = np.concatenate(qkv, 0)
        if w == "weight":  # d2 keeps the index buffer
          ws = int(round((np.sqrt(hf[k.replace("query.weight", "relative_position_bias_table")]
                                  .shape[0]) + 1) / 2))
          d2[b + "attn.relative_position_index"] = np.zeros((ws * ws, ws * ws), np.int64)
      elif tail == "attention.self.relative_position_bias_table":
        d2[b + "attn.relative_position_bias_table"] = v
      elif not tail.startswith(("attention.self.key.", "attention.self.value.")):
        name, w = tail.rsplit(".", 1)
        d2[b + f"{ren[name]}.{w}"] = v
    elif rest.startswith("embeddings.patch_embeddings.projection."):
      d2["backbone.patch_embed.proj." + rest.rsplit(".", 1)[1]] = v
    elif rest.startswith("embeddings.norm."):
      d2["backbone.patch_embed.norm." + rest.rsplit(".", 1)[1]] = v
    elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.downsample\.(.*)", rest):
      d2[f"backbone.layers.{m[1]}.downsample.{m[2]}"] = v
    elif m := re.fullmatch(r"hidden_states_norms\.stage(\d+)\.(weight|bias)", rest):
      d2[f"backbone.norm{int(m[1]) - 1}.{m[2]}"] = v
  d2["sem_seg_head.predictor.query_embed.weight"] = np.zeros((3, 16), np.float32)  # not backbone
  return d2


def test_detectron2_pickle_matches_hf(m2f, tmp_path):
  hf = _hf_tensors(m2f["path"])
  d2 = _hf_to_d2(hf, M2F_PREFIX)
  assert "backbone.layers.0.blocks.1.attn.qkv.weight" in d2 and "backbone.norm3.weight" in d2
  assert d2["backbone.layers.0.blocks.0.attn.qkv.weight"].shape == (48, 16)
  pkl = tmp_path / "model_final.pkl"
  with open(pkl, "wb") as f:
    pickle.dump({"model": d2, "__author__": "test"}, f)
  ours_d2 = tensor_io.flatten(import_swin(str(pkl)))
  ours_hf = tensor_io.flatten(import_swin(str(m2f["path"])))
  assert set(ours_d2) == set(ours_hf)
  for k in ours_hf:
    assert np.array_equal(ours_d2[k], ours_hf[k]), k
  # the converted dict is the HF saved layout itself (minus the unused final norm)
  assert set(d2_swin_to_hf(d2)) == _not_ignored(hf, M2F_PREFIX)
  with pytest.raises(UserError, match="absolute"):
    d2_swin_to_hf({**d2, "backbone.absolute_pos_embed": np.zeros(1)})


def test_export_loads_with_from_pretrained(standalone, tmp_path):
  from transformers import SwinBackbone as HFSwinBackbone

  cfg = SwinConfig.from_hf(standalone["hf_config"])
  save_swin_backbone(import_swin(standalone["model"].state_dict()), str(tmp_path), cfg)
  loaded = HFSwinBackbone.from_pretrained(str(tmp_path)).eval()
  want = standalone["model"].state_dict()
  for k, v in loaded.state_dict().items():
    if "layernorm" in k and "swin.layernorm" in k:
      continue  # not exported (the backbone never applies it)
    assert torch.equal(v, want[k]), k
  with torch.no_grad():
    got = loaded(standalone["x"]).feature_maps
  for g, r in zip(got, standalone["ref"]):
    assert torch.equal(g, r)


# ----------------------------------------------------------------------------------------- sharding
def test_sharded_equals_unsharded(m2f, m2f_ours):
  model = SwinBackbone(m2f_ours["config"])
  x, params, want = _nhwc(m2f["x"]), m2f_ours["params"], m2f_ours["outs"]
  mesh = sharding.make_mesh(data=1, fsdp=4, tensor=2)
  boxed = jax.eval_shape(model.init, jax.random.key(0), x[:1])
  shard = sharding.logical_shardings(boxed, mesh)["params"]
  # every param carries logical names from the rule table
  specs = jax.tree.leaves(nn.get_partition_spec(boxed), is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))
  assert specs and all(isinstance(s, jax.sharding.PartitionSpec) for s in specs)
  names = {n for s in jax.tree.leaves(jax.tree.map(lambda b: tuple(b.names), boxed,
                                                   is_leaf=lambda b: isinstance(b, nn.Partitioned)))
           for n in ([s] if isinstance(s, str) else s)}
  assert names <= set(sharding.AXIS_NAMES) and "head_embed" in names and "layers" in names
  with sharding.in_mesh(mesh):
    p = jax.device_put(params, shard)
    xs = jax.device_put(x, sharding.batch_sharding(mesh, 4))
    got = jax.jit(model.apply)({"params": p}, xs)
  for g, w in zip(got, want):
    assert len(g.sharding.device_set) == 8
    assert np.abs(np.asarray(g) - np.asarray(w)).max() <= 1e-5


# ------------------------------------------------------------------------------------------- config
def test_swin_b_preset_shapes():
  cfg = SwinConfig.from_dict(presets.model_config("mipha3b").swin)
  assert cfg.depths == (2, 2, 18, 2) and cfg.window_size == 12
  x = jax.ShapeDtypeStruct((1, 1024, 1024, 3), jnp.float32)
  model = SwinBackbone(cfg)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  outs = jax.eval_shape(model.apply, variables, x)
  assert [o.shape for o in outs] == [(1, 256, 256, 128), (1, 128, 128, 256), (1, 64, 64, 512),
                                     (1, 32, 32, 1024)]
  # the 18 blocks of stage 3 are one scanned stack
  table = nn.meta.unbox(variables)["params"]["stage2"]["blocks"]["attention"]["relative_position_bias_table"]
  assert table.shape == (18, 23 * 23, 16)
  with pytest.raises(UserError, match="unknown"):
    SwinConfig.from_dict({**presets.model_config("tiny").swin.to_dict(), "windowsize": 7})


def test_tiny_preset_bf16_traces():
  cfg = SwinConfig.from_dict(presets.model_config("tiny").swin)
  x = jax.ShapeDtypeStruct((2, 128, 128, 3), jnp.float32)
  model = SwinBackbone(cfg, dtype="bfloat16")
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nn.meta.unbox(variables)))
  outs = jax.eval_shape(model.apply, variables, x)
  assert [(o.shape, o.dtype) for o in outs] == [((2, 32 // 2 ** i, 32 // 2 ** i, 32 * 2 ** i), jnp.bfloat16)
                                                for i in range(4)]
