"""mlp2x_gelu projector vs torch nn.Sequential(Linear, GELU, Linear); the image-token splice."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch

from segearth_jax.convert.name_map import NameMap
from segearth_jax.tensor_io import flatten
from segearth_jax.convert.siglip_map import projector_rules
from segearth_jax.models.projector import Projector, splice_image_tokens


def test_projector_matches_torch_and_roundtrips():
  torch.manual_seed(0)
  d_in, d_out = 15, 22
  seq = torch.nn.Sequential(torch.nn.Linear(d_in, d_out), torch.nn.GELU(), torch.nn.Linear(d_out, d_out))
  # as stored inside a LLaVA/Mipha checkpoint
  sd = {f"model.mm_projector.{k}": v.detach().numpy() for k, v in seq.state_dict().items()}
  nm = NameMap(projector_rules("model.mm_projector.", ours_prefix="mm_projector"))
  params = nm.to_ours(sd.keys(), sd.__getitem__)["mm_projector"]

  x = torch.randn(2, 5, d_in) * 3  # wide range: tanh-GELU would differ from erf-GELU by > 1e-4
  with torch.no_grad():
    ref = seq(x).numpy()
  proj = Projector(hidden_size=d_in, out_features=d_out)
  got = jax.jit(proj.apply)({"params": params}, jnp.asarray(x.numpy()))
  assert got.shape == (2, 5, d_out)
  np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)

  back = dict(nm.to_theirs({"mm_projector": params}))
  assert set(back) == set(sd)
  for k, v in sd.items():
    assert back[k].dtype == v.dtype and np.array_equal(back[k], v), k

  # init creates the same tree the map fills
  init = nn.meta.unbox(proj.init(jax.random.PRNGKey(0), jnp.zeros((1, 1, d_in)))["params"])
  shape = lambda t: {k: v.shape for k, v in flatten(t).items()}
  assert shape(init) == shape(params)


def test_splice_rows_and_gradients():
  b, length, n, d = 3, 9, 4, 5
  tok = jax.random.normal(jax.random.PRNGKey(0), (b, length, d))
  img = jax.random.normal(jax.random.PRNGKey(1), (b, n, d))
  start = jnp.array([0, 2, length - n])  # at the front, inside, at the very end
  out = jax.jit(splice_image_tokens)(tok, img, start)

  want = np.array(tok)
  for i, s in enumerate(np.asarray(start)):
    want[i, s:s + n] = np.asarray(img[i])
  np.testing.assert_array_equal(out, want)

  # d/dtok is 1 outside the image span and 0 inside; every image row reaches the output exactly once
  w = jax.random.normal(jax.random.PRNGKey(2), (b, length, d))
  loss = lambda t, m: jnp.sum(splice_image_tokens(t, m, start) * w)
  g_tok, g_img = jax.grad(loss, argnums=(0, 1))(tok, img)
  inside = np.zeros((b, length, 1), bool)
  for i, s in enumerate(np.asarray(start)):
    inside[i, s:s + n] = True
  np.testing.assert_array_equal(g_tok, np.where(inside, 0.0, w))
  np.testing.assert_array_equal(
      g_img, np.stack([np.asarray(w[i, s:s + n]) for i, s in enumerate(np.asarray(start))]))
