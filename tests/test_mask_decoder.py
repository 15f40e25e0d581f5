"""Masked-attention decoder vs transformers' Mask2FormerTransformerModule, weights through our name map."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import Mask2FormerConfig, SwinConfig
from transformers.models.mask2former.modeling_mask2former import Mask2FormerTransformerModule

from segearth_jax import presets
from segearth_jax.convert.mask_decoder_map import mask_decoder_ignore, mask_decoder_rules
from segearth_jax.convert.name_map import NameMap
from segearth_jax.models.mask_decoder import MaskDecoder, MaskDecoderConfig
from segearth_jax.sharding import AXIS_NAMES

# (feature_size, mask_feature_size, hidden_dim, heads, ffn, decoder_layers, pre_norm, sizes, flat_mask_features)
CASES = {
    # post-norm, no input projections, 3 layers (each level once), spatially varying masks
    "post": (32, 32, 32, 4, 64, 4, False, ((2, 3), (4, 6), (8, 12)), False),
    # pre-norm, input projections, mask width != hidden, 5 layers; spatially constant mask features make
    # whole rows masked, which exercises the 'fully masked row -> unmasked' fallback
    "pre_proj": (16, 24, 32, 2, 48, 6, True, ((2, 2), (4, 4), (8, 8)), True),
}


def _hf_module(case, num_queries):
  fs, mfs, hd, heads, ffn, dl, pre, _, _ = CASES[case]
  cfg = Mask2FormerConfig(backbone_config=SwinConfig(), feature_size=fs, mask_feature_size=mfs, hidden_dim=hd,
                          num_attention_heads=heads, dim_feedforward=ffn, decoder_layers=dl, pre_norm=pre,
                          num_queries=num_queries)
  torch.manual_seed(0)
  m = Mask2FormerTransformerModule(in_features=fs, config=cfg).eval()
  with torch.no_grad():  # non-trivial biases / norms so the map is checked on every tensor
    for n, p in m.named_parameters():
      if n.endswith("bias") or "norm" in n:
        p.add_(0.1 * torch.randn_like(p))
  return cfg, m


def _inputs(case, bsz, k, seed=0):
  fs, mfs, hd, _, _, _, _, sizes, flat = CASES[case]
  rng = np.random.default_rng(seed)
  feats = [rng.normal(size=(bsz, h, w, fs)).astype(np.float32) for h, w in sizes]
  h4, w4 = 2 * sizes[-1][0], 2 * sizes[-1][1]
  if flat:
    mf = np.broadcast_to(rng.normal(size=(bsz, 1, 1, mfs)), (bsz, h4, w4, mfs)).astype(np.float32).copy()
    mf += 0.01 * rng.normal(size=mf.shape).astype(np.float32)
  else:
    mf = rng.normal(size=(bsz, h4, w4, mfs)).astype(np.float32)
  q = rng.normal(size=(bsz, k, hd)).astype(np.float32)
  return q, feats, mf


def _to_ours(hf_module, cfg):
  sd = {k: v.detach().numpy() for k, v in hf_module.state_dict().items()}
  proj = cfg.feature_size != cfg.hidden_dim
  nm = NameMap(mask_decoder_rules(prefix="", input_projections=proj), mask_decoder_ignore(prefix=""))
  return nm.to_ours(sd.keys(), sd.__getitem__)


def _hf_run(m, q_one, feats_one, mf_one):
  """One image through HF with ``q_one`` [K,C] injected as the learned queries, zero query position."""
  with torch.no_grad():
    m.queries_features.weight.copy_(torch.from_numpy(q_one))
    m.queries_embedder.weight.zero_()
    out = m([torch.from_numpy(f).permute(0, 3, 1, 2) for f in feats_one],
            torch.from_numpy(mf_one).permute(0, 3, 1, 2))
  return np.stack([p[0].numpy() for p in out.masks_queries_logits])   # [L+1, K, H4, W4]


@pytest.mark.parametrize("case", list(CASES))
def test_matches_transformers_per_layer(case):
  bsz, k = 2, 3
  q, feats, mf = _inputs(case, bsz, k)
  hf_cfg, m = _hf_module(case, k)
  params = _to_ours(m, hf_cfg)
  dec = MaskDecoder(MaskDecoderConfig.from_hf(hf_cfg))
  valid = np.ones((bsz, k), bool)
  apply = jax.jit(dec.apply, static_argnames="self_attention")
  full = np.asarray(apply({"params": params}, q, valid, feats, mf, self_attention="full"))
  diag = np.asarray(apply({"params": params}, q, valid, feats, mf))
  assert full.shape == (hf_cfg.decoder_layers, bsz, k) + mf.shape[1:3]
  for b in range(bsz):
    fb = [f[b:b + 1] for f in feats]
    # all queries of an image together (HF's own self-attention among queries)
    ref = _hf_run(m, q[b], fb, mf[b:b + 1])
    np.testing.assert_allclose(full[:, b], ref, atol=1e-4, rtol=0)
    # each query alone in HF == our diagonal self-attention batch
    for j in range(k):
      m1 = _hf_module(case, 1)[1]
      m1.load_state_dict({kk: v for kk, v in m.state_dict().items() if "queries" not in kk}, strict=False)
      ref1 = _hf_run(m1, q[b, j:j + 1], fb, mf[b:b + 1])
      np.testing.assert_allclose(diag[:, b, j], ref1[:, 0], atol=1e-4, rtol=0)
  # the two modes differ (the diagonal mask is doing something)
  assert np.abs(full - diag).max() > 1e-3
  if case == "pre_proj":   # the fallback path was exercised: some prediction masks a whole row
    small = np.asarray(jax.image.resize(jnp.asarray(diag), diag.shape[:3] + (2, 2), "linear", antialias=False))
    assert (small < 0).all(axis=(-1, -2)).any()


def test_padded_slots_change_nothing():
  case = "post"
  q, feats, mf = _inputs(case, 2, 4, seed=1)
  hf_cfg, m = _hf_module(case, 4)
  params = _to_ours(m, hf_cfg)
  dec = MaskDecoder(MaskDecoderConfig.from_hf(hf_cfg))
  valid = np.array([[True, True, False, False], [True, False, True, False]])
  apply = jax.jit(dec.apply, static_argnames="self_attention")
  for mode in ("diagonal", "full"):
    a = np.asarray(apply({"params": params}, q, valid, feats, mf, self_attention=mode))
    q2 = np.where(valid[..., None], q, 100.0 * np.random.default_rng(5).normal(size=q.shape)).astype(np.float32)
    b = np.asarray(apply({"params": params}, q2, valid, feats, mf, self_attention=mode))
    np.testing.assert_array_equal(a[:, valid], b[:, valid])
    assert (a[:, ~valid] == 0).all()
  # (diagonal batching == each query decoded alone is checked against HF in test_matches_transformers_per_layer)


def test_config_and_logical_axes():
  cfg = MaskDecoderConfig.from_dict(presets.model_config("tiny").mask_decoder)
  assert cfg.hidden_dim == 64 and cfg.num_layers == 3
  dec = MaskDecoder(cfg)
  shapes = jax.eval_shape(dec.init, jax.random.key(0), jnp.zeros((1, 2, 64)), jnp.ones((1, 2), bool),
                          [jnp.zeros((1, s, s, 64)) for s in (2, 4, 8)], jnp.zeros((1, 16, 16, 64)))
  specs = jax.tree.leaves(nn.get_partition_spec(shapes["params"]), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  names = {a for s in specs for a in s}
  assert names <= set(AXIS_NAMES) and names >= {"head_embed", "head_mlp", "head_heads", "head_levels", "norm"}
  assert len(specs) == len(jax.tree.leaves(shapes["params"]))
  assert all(len([a for a in s if a]) == len({a for a in s if a}) for s in specs)   # no name twice
