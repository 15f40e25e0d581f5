"""Phi decoder vs transformers' PhiForCausalLM (float32): logits with and without a KV cache, and the
HF -> ours -> HF round trip."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from segearth_jax.convert import phi_map
from segearth_jax.models.phi import Phi, PhiConfig, init_cache

# (hidden, heads, kv heads, partial rotary, layers, vocab): head_dim 20 with rotary dim 6; 5 heads of 12.
SHAPES = {
    "odd_rotary": dict(hidden_size=40, num_attention_heads=2, num_key_value_heads=2, partial_rotary_factor=0.3,
                       num_hidden_layers=2, vocab_size=96, intermediate_size=64),
    "five_heads": dict(hidden_size=60, num_attention_heads=5, num_key_value_heads=5, partial_rotary_factor=0.5,
                       num_hidden_layers=3, vocab_size=128, intermediate_size=48, hidden_act="gelu"),
}


def hf_tiny_phi(seed=0, **kw):
  torch.manual_seed(seed)
  cfg = transformers.PhiConfig(max_position_embeddings=64, resid_pdrop=0.0, embd_pdrop=0.0, **kw)
  model = transformers.PhiForCausalLM(cfg).eval()
  with torch.no_grad():  # non-trivial biases and norms so every param matters
    for name, p in model.named_parameters():
      if name.endswith("bias") or "layernorm" in name:
        p.add_(0.1 * torch.randn_like(p))
  return model


def ours_from_hf(model, **kw):
  cfg = PhiConfig.from_hf(model.config)
  params = phi_map.import_phi(model.state_dict())
  return Phi(cfg, **kw), jax.tree_util.tree_map(jnp.asarray, params)


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_logits_match_transformers_with_and_without_cache(shape):
  hf = hf_tiny_phi(**SHAPES[shape])
  model, params = ours_from_hf(hf)
  rng = np.random.default_rng(0)
  ids = rng.integers(0, hf.config.vocab_size, (2, 9))
  with torch.no_grad():
    ref = hf(torch.tensor(ids)).logits.numpy()

  @jax.jit
  def full(params, ids):
    return model.apply({"params": params}, model.apply({"params": params}, ids, method=Phi.embed))["logits"]

  out = np.asarray(full(params, jnp.asarray(ids)))
  assert np.abs(out - ref).max() <= 1e-4, np.abs(out - ref).max()

  # Cached: a 5-token prefill chunk, then 4 single-token steps, into a 12-slot cache.
  @jax.jit
  def step(params, ids, cache):
    e = model.apply({"params": params}, ids, method=Phi.embed)
    o = model.apply({"params": params}, e, cache=cache)
    return o["logits"], o["cache"]

  cache = init_cache(model.config, 2, 12)
  pieces = []
  lg, cache = step(params, jnp.asarray(ids[:, :5]), cache)
  pieces.append(np.asarray(lg))
  for t in range(5, 9):
    lg, cache = step(params, jnp.asarray(ids[:, t:t + 1]), cache)
    pieces.append(np.asarray(lg))
  cached = np.concatenate(pieces, 1)
  assert np.abs(cached - ref).max() <= 1e-4, np.abs(cached - ref).max()
  assert list(np.asarray(cache["index"])) == [9, 9]


def test_padding_mask_matches_transformers():
  hf = hf_tiny_phi(**SHAPES["odd_rotary"])
  model, params = ours_from_hf(hf)
  ids = np.random.default_rng(1).integers(0, 96, (2, 7))
  mask = np.array([[1] * 7, [1] * 4 + [0] * 3])
  with torch.no_grad():
    ref = hf(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  e = model.apply({"params": params}, jnp.asarray(ids), method=Phi.embed)
  out = np.asarray(model.apply({"params": params}, e, jnp.asarray(mask))["logits"])
  real = mask.astype(bool)
  assert np.abs(out[real] - ref[real]).max() <= 1e-4


def test_param_tree_and_logical_axes():
  cfg = PhiConfig.from_dict(dict(SHAPES["odd_rotary"], layer_norm_eps=1e-5))
  model = Phi(cfg)
  boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 3, 40))))["params"]
  assert set(boxed) == {"embed_tokens", "layers", "final_layernorm", "lm_head"}
  q = boxed["layers"]["self_attn"]["q_proj"]["kernel"]
  assert q.names == ("layers", "embed", "heads") and q.value.shape == (2, 40, 40)
  assert boxed["lm_head"]["kernel"].names == ("embed", "vocab")
  assert boxed["embed_tokens"]["embedding"].names == ("vocab", "embed")


def test_round_trip_bit_exact_and_from_pretrained(tmp_path):
  hf = hf_tiny_phi(**SHAPES["five_heads"])
  sd = {k: v.numpy() for k, v in hf.state_dict().items()}
  params = phi_map.import_phi(hf.state_dict())
  out = str(tmp_path / "phi")
  phi_map.export_phi(params, out, PhiConfig.from_hf(hf.config), max_shard_bytes=40_000)  # forces shards
  assert os.path.isfile(os.path.join(out, "model.safetensors.index.json"))
  back = phi_map.import_phi(out)
  exported = dict(phi_map.phi_name_map().to_theirs(back))
  assert set(exported) == set(sd)
  for k, v in sd.items():
    assert exported[k].dtype == v.dtype and np.array_equal(exported[k], v), k
  hf2 = transformers.PhiForCausalLM.from_pretrained(out).eval()
  for k, v in hf2.state_dict().items():
    assert np.array_equal(v.numpy(), sd[k]), k


def test_resize_token_embeddings_like_transformers():
  hf = hf_tiny_phi(**SHAPES["odd_rotary"])
  params = phi_map.import_phi(hf.state_dict())
  new = phi_map.resize_token_embeddings(params, 98, pad_to_multiple_of=64, seed=0)
  hf.resize_token_embeddings(98, pad_to_multiple_of=64)
  ref_e = hf.model.embed_tokens.weight.detach().numpy()
  ref_h = hf.lm_head.weight.detach().numpy()
  e, k, b = new["embed_tokens"]["embedding"], new["lm_head"]["kernel"], new["lm_head"]["bias"]
  assert e.shape == ref_e.shape == (128, 40) and k.shape == (40, 128) and b.shape == (128,)
  assert np.array_equal(e[:96], ref_e[:96]) and np.array_equal(k[:, :96], ref_h[:96].T)
  # Added rows: transformers samples N(mean, 1e-9 cov) -> both within ~1e-4 of the old mean.
  assert np.abs(e[96:] - ref_e[96:]).max() < 1e-3
  assert np.abs(k[:, 96:].T - ref_h[96:]).max() < 1e-3
  assert np.abs(b[96:] - hf.lm_head.bias.detach().numpy()[96:]).max() < 1e-3
  assert not np.allclose(e[96:], 0.0)
