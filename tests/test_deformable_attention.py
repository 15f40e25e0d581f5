"""Multi-scale deformable attention vs transformers' Mask2Former PyTorch implementation (CPU, float32)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.models.mask2former import modeling_mask2former as hf

from segearth_jax.models import deformable_attention as da

SHAPE_SETS = [
    # (levels' (h, w), batch, queries, heads, head_dim, points)
    (((6, 5), (3, 3), (2, 1)), 2, 7, 3, 4, 4),
    (((8, 8), (4, 4), (2, 2), (1, 1)), 1, 13, 2, 8, 2),
]


def _inputs(shapes, b, q, h, dh, p, seed):
  rng = np.random.default_rng(seed)
  s = sum(hh * ww for hh, ww in shapes)
  value = rng.normal(size=(b, s, h, dh)).astype(np.float32)
  # Well outside [0, 1] too: exercises the zero padding and partly-outside corners.
  loc = rng.uniform(-0.4, 1.4, size=(b, q, h, len(shapes), p, 2)).astype(np.float32)
  loc[0, 0, 0, :, 0] = [0.0, 1.0]     # exact borders
  loc[0, 0, 0, :, 1] = [1.0, 0.0]
  weights = rng.uniform(size=(b, q, h, len(shapes), p)).astype(np.float32)
  return value, loc, weights


@pytest.mark.parametrize("shape_set", SHAPE_SETS)
def test_core_matches_hf(shape_set):
  shapes, *dims = shape_set
  value, loc, weights = _inputs(shapes, *dims, seed=len(shapes))
  want = hf.multi_scale_deformable_attention(
      torch.tensor(value), list(shapes), torch.tensor(loc), torch.tensor(weights)).numpy()
  got = jax.jit(da.ms_deform_attn_core, static_argnums=1)(value, shapes, loc, weights)
  assert got.shape == want.shape
  assert np.abs(np.asarray(got) - want).max() <= 1e-4
  assert np.abs(want).max() > 0.1   # the comparison is not between zeros


def test_core_gradients_match_torch():
  """Training backpropagates through the gather (value) and the bilinear weights (locations)."""
  shapes, *dims = SHAPE_SETS[0]
  value, loc, weights = _inputs(shapes, *dims, seed=3)
  tv, tl, tw = (torch.tensor(a, requires_grad=True) for a in (value, loc, weights))
  cot = np.random.default_rng(4).normal(size=(dims[0], dims[1], dims[2] * dims[3])).astype(np.float32)
  (hf.multi_scale_deformable_attention(tv, list(shapes), tl, tw) * torch.tensor(cot)).sum().backward()
  grads = jax.grad(lambda v, l, w: jnp.sum(da.ms_deform_attn_core(v, shapes, l, w) * cot),
                   argnums=(0, 1, 2))(value, loc, weights)
  for got, want in zip(grads, (tv.grad, tl.grad, tw.grad)):
    assert np.abs(np.asarray(got) - want.numpy()).max() <= 1e-3 * max(1.0, np.abs(want.numpy()).max())


def test_kernel_seam_dispatches_by_name():
  shapes, *dims = SHAPE_SETS[0]
  value, loc, weights = _inputs(shapes, *dims, seed=5)
  calls = []

  def fake(v, s, l, w):
    calls.append(s)
    return 2 * da.IMPLS["xla"](v, s, l, w)

  da.register_impl("test_fake", fake)
  try:
    base = da.ms_deform_attn_core(value, shapes, loc, weights)
    doubled = da.ms_deform_attn_core(value, shapes, loc, weights, impl="test_fake")
    np.testing.assert_allclose(np.asarray(doubled), 2 * np.asarray(base), rtol=1e-6)
    assert calls == [shapes]
    with pytest.raises(ValueError, match="not registered"):
      da.ms_deform_attn_core(value, shapes, loc, weights, impl="nope")
  finally:
    da.IMPLS.pop("test_fake")


def test_module_matches_hf_module():
  shapes, b, q, heads, points, c = ((5, 4), (3, 2), (1, 1)), 2, 9, 4, 3, 32
  torch.manual_seed(0)
  ref = hf.Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention(c, heads, len(shapes), points).eval()
  with torch.no_grad():
    for p in ref.parameters():
      p.normal_(0.0, 0.3)
  s = sum(h * w for h, w in shapes)
  rng = np.random.default_rng(1)
  hidden = rng.normal(size=(b, q, c)).astype(np.float32)
  memory = rng.normal(size=(b, s, c)).astype(np.float32)
  pos = rng.normal(size=(b, q, c)).astype(np.float32)
  refp = np.repeat(rng.uniform(size=(b, q, 1, 2)).astype(np.float32), len(shapes), axis=2)
  with torch.no_grad():
    want, _ = ref(torch.tensor(hidden), encoder_hidden_states=torch.tensor(memory),
                  position_embeddings=torch.tensor(pos), reference_points=torch.tensor(refp),
                  spatial_shapes_list=list(shapes))
  sd = {k: v.numpy() for k, v in ref.state_dict().items()}
  params = {n: {"kernel": sd[f"{n}.weight"].T, "bias": sd[f"{n}.bias"]}
            for n in ("sampling_offsets", "attention_weights", "value_proj", "output_proj")}
  mod = da.MultiscaleDeformableAttention(c, heads, shapes, points)
  boxed = jax.eval_shape(lambda: mod.init(jax.random.key(0), hidden, memory, refp, pos))["params"]
  assert {k: v["kernel"].value.shape for k, v in boxed.items()} == {k: v["kernel"].shape for k, v in params.items()}
  got = jax.jit(mod.apply)({"params": params}, hidden, memory, refp, pos)
  assert np.abs(np.asarray(got) - want.numpy()).max() <= 1e-4
