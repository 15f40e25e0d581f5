"""The attention kernels' paths on CPU: attention_backend's decisions (the platform passed in), the mask-free
causal form == the dense mask == a numpy softmax (outputs and [SEG] rows, right-padded rows, an all-padding
row), the Phi decoder with 'fused' vs transformers on padded rows, and which kernel and mask form each call
site asks jax for when the backend is made to look like a CUDA GPU."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from segearth_jax.convert import phi_map
from segearth_jax.models import attention as attention_lib
from segearth_jax.models.phi import Phi, PhiConfig, init_cache
from segearth_jax.models.siglip import SiglipConfig, SiglipVisionTower

BF16, F16, F32 = jnp.bfloat16, jnp.float16, jnp.float32


@pytest.mark.parametrize("dtype,head_dim,platform,cc,dense,want", [
    (BF16, 80, "cuda", (9, 0), False, "cudnn"),    # Phi-2 at the paper shapes on H100 / H200
    (BF16, 72, "cuda", (9, 0), False, "cudnn"),    # SigLIP so400m
    (F16, 80, "cuda", (8, 0), False, "cudnn"),     # A100
    (BF16, 256, "cuda", (9, 0), False, "cudnn"),
    (BF16, 256, "cuda", (8, 0), False, "xla"),     # > 128 before Hopper
    (BF16, 264, "cuda", (9, 0), False, "xla"),     # > 256
    (BF16, 76, "cuda", (9, 0), False, "xla"),      # not a multiple of 8
    (F32, 80, "cuda", (9, 0), False, "xla"),
    (BF16, 80, "cuda", (7, 5), False, "xla"),      # pre-Ampere
    (BF16, 80, "cuda", (9, 0), True, "xla"),       # dense mask (the KV-cache path)
    (BF16, 80, "rocm", None, False, "xla"),
    (BF16, 80, "cpu", None, False, "xla"),
    (BF16, 80, "tpu", None, False, "xla"),
])
def test_attention_backend_rules(dtype, head_dim, platform, cc, dense, want):
  got = attention_lib.attention_backend(dtype, head_dim, dense_mask=dense, platform=platform,
                                        compute_capability=cc)
  assert got == want


def test_attention_backend_reads_the_local_platform():
  assert attention_lib.local_platform() == ("cpu", None)
  assert attention_lib.attention_backend(BF16, 80) == "xla"


def _numpy_attention(q, k, v, lengths, scale):
  """Causal softmax over keys j <= i, j < lengths[b]; a row with no valid key averages every key (what
  both jax kernels do with an all-masked row). -> out [B, L, H, D], probs [B, H, L, L]."""
  b, l, h, _ = q.shape
  kk, vv = (np.repeat(t, h // t.shape[2], axis=2) for t in (k, v))
  s = np.einsum("bqhd,bkhd->bhqk", q, kk) * scale
  j = np.arange(l)
  allowed = (j[None, None, :] <= j[None, :, None]) & (j[None, None, :] < np.asarray(lengths)[:, None, None])
  s = np.where(allowed[:, None], s, -1e30)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", p, vv), p


def test_mask_free_form_equals_dense_mask_and_numpy():
  rng = np.random.default_rng(0)
  b, l, h, hkv, d, n_img = 4, 9, 4, 2, 8, 3
  q = rng.standard_normal((b, l, h, d)).astype(np.float32)
  k = rng.standard_normal((b, l, hkv, d)).astype(np.float32)
  v = rng.standard_normal((b, l, hkv, d)).astype(np.float32)
  lengths = np.array([9, 5, 1, 0], np.int32)          # full, right-padded, one token, an all-padding row
  key_valid = jnp.asarray(np.arange(l)[None] < lengths[:, None])
  slots = jnp.broadcast_to(jnp.arange(l)[None], (b, l))
  dense = attention_lib.causal_mask(slots, key_valid)
  scale = d ** -0.5
  ref_out, ref_probs = _numpy_attention(q, k, v, lengths, scale)
  q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)

  mask_free = attention_lib.fused_attention(q, k, v, scale, is_causal=True, kv_lengths=jnp.asarray(lengths))
  dense_fused = attention_lib.fused_attention(q, k, v, scale, mask=dense)
  plain, probs = attention_lib.plain_attention(q, k, v, dense, scale)
  for name, got in (("mask-free", mask_free), ("dense fused", dense_fused), ("plain", plain)):
    assert np.abs(np.asarray(got) - ref_out).max() <= 1e-5, name
  assert np.abs(np.asarray(mask_free) - np.asarray(plain)).max() <= 1e-6
  assert np.abs(np.asarray(probs) - ref_probs).max() <= 1e-6

  # [SEG] rows: one on a real token, one on padding (row 1) and on the all-padding row
  seg_pos = jnp.asarray([[8, 3], [4, 7], [0, 2], [1, 5]])
  image_start = jnp.asarray([1, 0, 0, 2])
  seg_mask = attention_lib.causal_mask(seg_pos, key_valid)
  recomputed = attention_lib.seg_rows_recomputed(q, k, seg_mask, scale, seg_pos, image_start, n_img)
  picked = attention_lib.seg_rows_from_probs(probs, seg_pos, image_start, n_img)
  ref_rows = np.stack([np.stack([ref_probs[i, :, p, s:s + n_img].sum(0) for p in np.asarray(seg_pos)[i]])
                       for i, s in enumerate(np.asarray(image_start))])
  assert np.abs(np.asarray(recomputed) - ref_rows).max() <= 1e-5
  assert np.abs(np.asarray(picked) - ref_rows).max() <= 1e-5
  assert float(ref_rows.max()) > 0.5   # the rows are not all near zero


PHI = dict(hidden_size=40, num_attention_heads=2, num_key_value_heads=2, partial_rotary_factor=0.3,
           num_hidden_layers=2, vocab_size=96, intermediate_size=64)


def test_phi_fused_matches_transformers_and_plain_on_padded_rows():
  torch.manual_seed(0)
  hf = transformers.PhiForCausalLM(transformers.PhiConfig(max_position_embeddings=64, resid_pdrop=0.0,
                                                          embd_pdrop=0.0, **PHI)).eval()
  with torch.no_grad():
    for name, p in hf.named_parameters():
      if name.endswith("bias") or "layernorm" in name:
        p.add_(0.1 * torch.randn_like(p))
  params = jax.tree_util.tree_map(jnp.asarray, phi_map.import_phi(hf.state_dict()))
  cfg = PhiConfig.from_hf(hf.config)
  ids = np.random.default_rng(1).integers(0, 96, (4, 8))
  lengths = np.array([8, 5, 2, 0])
  mask = (np.arange(8)[None] < lengths[:, None]).astype(np.int64)
  with torch.no_grad():
    ref = hf(torch.tensor(ids[:3]), attention_mask=torch.tensor(mask[:3])).logits.numpy()

  def forward(impl):
    model = Phi(cfg, attention_impl=impl)
    e = model.apply({"params": params}, jnp.asarray(ids), method=Phi.embed)
    return jax.jit(model.apply)({"params": params}, e, jnp.asarray(mask))

  fused, plain = forward("fused"), forward("plain")
  real = mask[:3].astype(bool)
  assert np.abs(np.asarray(fused["logits"])[:3][real] - ref[real]).max() <= 1e-4
  # every position, padding and the all-padding row included
  for key in ("logits", "hidden"):
    assert np.abs(np.asarray(fused[key]) - np.asarray(plain[key])).max() <= 1e-5, key
  assert np.abs(np.asarray(forward("fused_xla")["logits"]) - np.asarray(fused["logits"])).max() == 0


def test_unknown_attention_impl_is_refused():
  x = jnp.zeros((1, 3, 8))
  with pytest.raises(ValueError, match="attention_impl"):
    Phi(PhiConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                  num_attention_heads=2, partial_rotary_factor=0.5), attention_impl="flash").init(jax.random.PRNGKey(0), x)


class _Recorder:
  """Stands in for jax.nn.dot_product_attention: records what each call asked for, then runs the XLA
  kernel (this machine has no cuDNN) with the same arguments."""

  def __init__(self, real):
    self.real, self.calls = real, []

  def __call__(self, q, k, v, bias=None, mask=None, *, implementation=None, key_value_seq_lengths=None, **kw):
    self.calls.append(dict(implementation=implementation, dtype=q.dtype, head_dim=q.shape[-1],
                           dense_mask=mask is not None, is_causal=kw.get("is_causal", False),
                           kv_lengths=key_value_seq_lengths))
    return self.real(q, k, v, bias, mask, implementation="xla", key_value_seq_lengths=key_value_seq_lengths,
                     **kw)


@pytest.fixture
def looks_like_h100(monkeypatch):
  recorder = _Recorder(jax.nn.dot_product_attention)
  monkeypatch.setattr(jax.nn, "dot_product_attention", recorder)
  monkeypatch.setattr(attention_lib, "local_platform", lambda: ("cuda", (9, 0)))
  return recorder


def test_call_sites_on_a_cuda_gpu(looks_like_h100):
  calls = looks_like_h100.calls
  cfg = PhiConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, partial_rotary_factor=0.5)                         # head dim 16
  model = Phi(cfg, attention_impl="fused", dtype=BF16, scan_layers=False)
  x = jnp.zeros((2, 6, 64), BF16)
  mask = jnp.asarray([[1] * 6, [1] * 3 + [0] * 3])
  params = nn.meta.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), x)["params"])

  calls.clear()
  out = jax.eval_shape(lambda p: model.apply({"params": p}, x, mask, seg_positions=jnp.asarray([[4], [2]]),
                                             image_start=jnp.asarray([0, 0]), n_image_tokens=2), params)
  assert out["seg_attn"].shape == (2, 2, 1, 2)
  assert len(calls) == 2 and all(c["implementation"] == "cudnn" and c["is_causal"] and not c["dense_mask"]
                                 for c in calls)
  assert all(c["dtype"] == BF16 and c["head_dim"] == 16 for c in calls)

  # the lengths cuDNN gets: the row sums, raised to 1 for a row with no real token
  calls.clear()
  model.apply({"params": jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), params)}, x,
              jnp.asarray([[1] * 6, [0] * 6]))
  assert [list(np.asarray(c["kv_lengths"])) for c in calls] == [[6, 1], [6, 1]]

  calls.clear()  # the KV-cache path keeps the dense mask, so XLA
  jax.eval_shape(lambda p: model.apply({"params": p}, x, mask, cache=init_cache(cfg, 2, 8, BF16)), params)
  assert len(calls) == 2 and all(c["implementation"] == "xla" and c["dense_mask"] for c in calls)

  calls.clear()  # float32 on the same GPU: XLA, still mask-free
  jax.eval_shape(lambda p: Phi(cfg, attention_impl="fused", scan_layers=False).apply(
      {"params": p}, x.astype(F32), mask), params)
  assert calls and all(c["implementation"] == "xla" and not c["dense_mask"] for c in calls)

  calls.clear()  # 'fused_xla' forces XLA
  jax.eval_shape(lambda p: Phi(cfg, attention_impl="fused_xla", dtype=BF16, scan_layers=False).apply(
      {"params": p}, x, mask), params)
  assert calls and all(c["implementation"] == "xla" for c in calls)

  calls.clear()  # SigLIP: no mask at all
  vcfg = SiglipConfig(hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      image_size=28, patch_size=14, feature_layer=-1)
  tower = SiglipVisionTower(vcfg, attention_impl="fused", dtype=BF16)
  pix = jnp.zeros((1, 28, 28, 3))
  jax.eval_shape(lambda: tower.init_with_output(jax.random.PRNGKey(0), pix))
  assert calls and all(c["implementation"] == "cudnn" and not c["dense_mask"] and not c["is_causal"]
                       and c["kv_lengths"] is None for c in calls)
