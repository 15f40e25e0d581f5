"""L_S vs a direct numpy transcription of each formula and divisor; the authors' target grid vs
torch.nn.functional.interpolate; fused + recomputed [SEG] rows == plain softmax (values and gradients),
through the Phi decoder."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segearth_jax.attention_supervision import ls_loss
from segearth_jax.data.preprocess import AUTHORS_LS_CANVAS, mask_grid_authors, mask_grid_touches
from segearth_jax.models import attention as attention_lib
from segearth_jax.models.phi import Phi, PhiConfig


def numpy_ls(seg_attn, grid, valid, heads, form, divisor="kept"):
  n_layers, b, k, n = seg_attn.shape
  losses = []
  for i in range(b):
    for j in range(k):
      g = grid[i, j].reshape(-1) > 0.5
      if not valid[i, j] or g.sum() == 0:
        continue
      maps = [seg_attn[:, i, j].mean(0) / heads] if form == "paper" else [seg_attn[l, i, j] for l in range(n_layers)]
      total = 0.0
      for A in maps:
        a = A[~g].mean() if (~g).any() else 0.0
        inner = np.mean((A[g] - a) ** 2)
        total += -np.log(inner) if form == "paper" else -np.log(inner + 1e-8)
      losses.append(total)
  count = len(losses) if divisor == "kept" else int(valid.sum())   # 'all': every real [SEG] row
  return sum(losses) / count if count else 0.0


@pytest.mark.parametrize("form", ["paper", "baseline"])
@pytest.mark.parametrize("divisor", ["kept", "all"])
def test_ls_matches_numpy(form, divisor):
  rng = np.random.default_rng(0)
  layers, b, k, g, heads = 3, 2, 4, 5, 4
  seg_attn = rng.random((layers, b, k, g * g)).astype(np.float32) * 0.2
  grid = (rng.random((b, k, g, g)) > 0.6).astype(np.float32)
  grid[0, 1] = 0.0          # empty foreground: skipped
  grid[1, 2] = 1.0          # empty background: a = 0
  valid = np.ones((b, k), bool)
  valid[1, 3] = False       # padding slot: skipped
  got = float(ls_loss(jnp.asarray(seg_attn), jnp.asarray(grid), jnp.asarray(valid), num_heads=heads, form=form,
                      divisor=divisor))
  ref = numpy_ls(seg_attn.astype(np.float64), grid, valid, heads, form, divisor)
  assert abs(got - ref) <= 1e-4 * max(1.0, abs(ref)), (got, ref)
  # 7 valid rows, one with an empty target: 'all' divides by 7, 'kept' by 6
  kept = numpy_ls(seg_attn.astype(np.float64), grid, valid, heads, form, "kept")
  if divisor == "all":
    assert abs(got - kept * 6 / 7) <= 1e-4 * max(1.0, abs(kept))


@pytest.mark.parametrize("shape, grid", [((40, 40), 2), ((37, 53), 27), ((1024, 768), 27), ((800, 800), 27),
                                         ((5, 3), 5), ((300, 200), 13)])
def test_authors_grid_matches_torch_interpolate(shape, grid):
  """Their target: F.interpolate(mask, (800, 800), 'nearest') -> F.interpolate(.., (G, G), 'bilinear',
  align_corners=False) -> > 0."""
  import torch
  import torch.nn.functional as F
  rng = np.random.default_rng(shape[0] * 31 + grid)
  h, w = shape
  masks = [(rng.random(shape) > 0.97).astype(np.uint8),                   # scattered pixels
           np.zeros(shape, np.uint8), np.ones(shape, np.uint8)]
  line = np.zeros(shape, np.uint8)
  line[:, w // 3] = 1                                                      # a one-pixel column
  box = np.zeros(shape, np.uint8)
  box[h // 4:h // 2 + 1, w // 5:(3 * w) // 5] = 1
  masks += [line, box]
  for m in masks:
    t = torch.from_numpy(m)[None, None].float()
    big = F.interpolate(t, size=(AUTHORS_LS_CANVAS, AUTHORS_LS_CANVAS), mode="nearest")
    ref = (F.interpolate(big, size=(grid, grid), mode="bilinear", align_corners=False) > 0)[0, 0].numpy()
    got = mask_grid_authors(m, grid)
    assert got.dtype == np.float32 and got.shape == (grid, grid)
    np.testing.assert_array_equal(got, ref.astype(np.float32))


def test_authors_grid_samples_patch_centres():
  """A pixel at a patch corner: 'touches' marks its patch, the authors' grid (taps near centres) does not."""
  m = np.zeros((378, 378), np.uint8)
  m[0, 0] = 1
  assert mask_grid_touches(m, 378, 27, 14)[0, 0] == 1 and mask_grid_authors(m, 27).sum() == 0
  m[7, 7] = 1   # the patch centre
  assert mask_grid_authors(m, 27)[0, 0] == 1


def test_ls_no_valid_rows_is_zero_with_finite_grads():
  seg_attn = jnp.full((2, 1, 2, 9), 0.1)
  grid = jnp.zeros((1, 2, 9))
  for form in ("paper", "baseline"):
    val, grad = jax.value_and_grad(lambda s: ls_loss(s, grid, jnp.ones((1, 2), bool), num_heads=2, form=form))(seg_attn)
    assert float(val) == 0.0 and bool(jnp.isfinite(grad).all())


CFG = PhiConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, partial_rotary_factor=0.5, max_position_embeddings=64)


def test_fused_recomputed_rows_equal_plain_values_and_grads():
  b, l, n_img, start = 2, 14, 6, 2
  x = jax.random.normal(jax.random.PRNGKey(0), (b, l, 32))
  mask = jnp.asarray(np.array([[1] * 14, [1] * 11 + [0] * 3]))
  seg_pos = jnp.asarray([[9, 12], [10, 13]])   # row 1's second [SEG] sits on padding
  image_start = jnp.asarray([start, start + 1])
  grid = jnp.asarray((np.random.default_rng(0).random((b, 2, n_img)) > 0.5).astype(np.float32))
  valid = jnp.asarray([[True, True], [True, False]])
  params = nn.meta.unbox(jax.jit(Phi(CFG).init)(jax.random.PRNGKey(1), x[:, :3])["params"])

  def run(impl):
    model = Phi(CFG, attention_impl=impl, remat_policy="nothing_saveable")

    def loss(p):
      out = model.apply({"params": p}, x, mask, seg_positions=seg_pos, image_start=image_start,
                        n_image_tokens=n_img)
      ls = ls_loss(out["seg_attn"], grid, valid, num_heads=CFG.num_attention_heads, form="paper")
      return ls + 1e-3 * (out["logits"] * mask[..., None]).sum(), out
    (val, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return val, out, grads

  v_p, o_p, g_p = run("plain")
  v_f, o_f, g_f = run("fused")
  assert o_p["seg_attn"].shape == (2, b, 2, n_img)
  # rows are probabilities summed over heads: each row's total over all keys is num_heads
  assert float(o_p["seg_attn"].max()) <= CFG.num_attention_heads + 1e-5 and float(o_p["seg_attn"].min()) >= 0
  assert np.abs(np.asarray(o_p["seg_attn"]) - np.asarray(o_f["seg_attn"])).max() <= 1e-5
  assert np.abs(np.asarray(o_p["logits"]) - np.asarray(o_f["logits"])).max() <= 1e-4
  assert abs(float(v_p) - float(v_f)) <= 1e-4
  diffs = jax.tree_util.tree_map(lambda a, c: float(jnp.abs(a - c).max()), g_p, g_f)
  scale = max(jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda a: float(jnp.abs(a).max()), g_p)))
  assert max(jax.tree_util.tree_leaves(diffs)) <= 1e-4 * max(1.0, scale)
  assert float(jnp.abs(g_p["layers"]["self_attn"]["k_proj"]["kernel"]).max()) > 0


def test_seg_rows_match_direct_softmax():
  """seg_attn = heads-summed softmax(QK^T/sqrt(d) + causal mask) rows, checked against numpy."""
  rng = np.random.default_rng(3)
  q = rng.standard_normal((1, 7, 4, 8)).astype(np.float32)
  k = rng.standard_normal((1, 7, 2, 8)).astype(np.float32)
  seg_mask = attention_lib.causal_mask(jnp.asarray([[5]]), jnp.ones((1, 7)))   # the [SEG] query's row
  got = attention_lib.seg_rows_recomputed(jnp.asarray(q), jnp.asarray(k), seg_mask, 8 ** -0.5,
                                         jnp.asarray([[5]]), jnp.asarray([1]), 3)
  kk = np.repeat(k, 2, axis=2)
  s = np.einsum("qhd,khd->hqk", q[0], kk[0]) / np.sqrt(8)
  s = np.where(np.tril(np.ones((7, 7), bool))[None], s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  ref = p[:, 5, 1:4].sum(0)
  assert np.abs(np.asarray(got)[0, 0] - ref).max() <= 1e-5
