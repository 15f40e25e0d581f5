"""Per-part learning rates and the trainable split (segearth_jax/optim.py)."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from segearth_jax.optim import lr_scale_of, make_optimizer, split_params


def _train_cfg(**kw):
  d = dict(steps=10, lr=1e-2, warmup_ratio=0.0, schedule="constant", weight_decay=0.0, grad_clip=0.0,
           b1=0.9, b2=0.999, lr_scale=ml_collections.ConfigDict())
  d.update(kw)
  return ml_collections.ConfigDict(d)


def _params():
  return {"llm": {"layers": {"w": jnp.ones((2, 3))}, "lora": {"a": jnp.ones((3,))}},
          "vision": {"w": jnp.ones((4,))}, "mask_head": {"w": jnp.ones((2,))}}


def test_lr_scale_multiplies_each_named_part_innermost_name_wins():
  params = _params()
  grads = jax.tree.map(lambda x: jnp.full_like(x, 0.5), params)
  plain, _ = make_optimizer(_train_cfg())
  scaled, _ = make_optimizer(_train_cfg(lr_scale=dict(llm=0.1, lora=2.0, vision=0.0)))
  u0, _ = plain.update(grads, plain.init(params), params)
  u1, _ = scaled.update(grads, scaled.init(params), params)
  want = {"llm": {"layers": {"w": 0.1}, "lora": {"a": 2.0}}, "vision": {"w": 0.0}, "mask_head": {"w": 1.0}}
  jax.tree.map(lambda a, b, m: np.testing.assert_allclose(np.asarray(b), m * np.asarray(a), rtol=1e-6),
               u0, u1, want)
  assert float(jnp.abs(u0["llm"]["layers"]["w"]).max()) > 0       # Adam's first step: lr * sign(grad)


def test_lr_scale_of_and_split():
  assert lr_scale_of(("llm", "layers", "q_proj", "lora", "a"), {"llm": 0.2, "lora": 1.0}) == 1.0
  assert lr_scale_of(("llm", "layers", "q_proj", "kernel"), {"llm": 0.2, "lora": 1.0}) == 0.2
  assert lr_scale_of(("mask_head", "w"), {"llm": 0.2}) == 1.0
  train, frozen = split_params(_params(), ("lora", "mask_head"))
  assert set(train) == {"llm", "mask_head"} and set(train["llm"]) == {"lora"}
  assert set(frozen) == {"llm", "vision"} and set(frozen["llm"]) == {"layers"}
