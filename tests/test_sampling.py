"""Sampled decoding against transformers' warpers (TemperatureLogitsWarper -> TopKLogitsWarper -> TopPLogitsWarper,
generate's order): the same filtered scores on fixed logits, draws only inside the allowed set over many seeds
(directly and through `generate` on a tiny Phi, the allowed set taken from transformers' own forward), temperature
0 == greedy, seeds reproducible without recompiles, and the [SEG] cap: no cap returns every generated [SEG]."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from segearth_jax import generate as generate_lib
from segearth_jax.errors import UserError
from segearth_jax.experiment import DECODING_PRESETS, apply_decoding, base_config
from segearth_jax.generate import filter_logits, generate, pick_tokens, seg_slots
from test_phi import SHAPES, hf_tiny_phi, ours_from_hf

V = 40
LOGITS = np.random.default_rng(0).normal(scale=2.0, size=V).astype(np.float32)
# (temperature, top_k, top_p): each filter alone, both, extremes (top_k 1, top_k > V, a small nucleus)
SETTINGS = [(1.0, 5, 1.0), (1.0, 0, 0.8), (0.7, 10, 0.9), (2.0, 0, 0.3), (0.2, 50, 1.0), (1.0, 1, 1.0),
            (1.5, 8, 0.6), (3.0, 0, 1.0)]


def hf_scores(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
  """transformers' sampling scores [N, V] for logits [N, V], the warpers as generate adds them."""
  s = torch.tensor(np.asarray(logits, np.float32))
  if temperature != 1.0:
    s = TemperatureLogitsWarper(float(temperature))(None, s)
  if top_k:
    s = TopKLogitsWarper(top_k)(None, s)
  if top_p < 1.0:
    s = TopPLogitsWarper(top_p)(None, s)
  return s.numpy()


@functools.partial(jax.jit, static_argnums=1)
def _draws(logits, n, temperature, top_k, top_p):
  """n draws from one logits vector, one seed each."""
  keys = jax.vmap(jax.random.key)(jnp.arange(n))
  return jax.vmap(lambda key: pick_tokens(logits[None], key, temperature, top_k, top_p)[0])(keys)


_pick = jax.jit(pick_tokens)                 # options traced: one compile for every call below


@pytest.mark.parametrize("setting", SETTINGS)
def test_filtered_scores_match_transformers(setting):
  ours = np.asarray(filter_logits(jnp.asarray(LOGITS[None]), *setting))[0]
  theirs = hf_scores(LOGITS[None], *setting)[0]
  assert np.array_equal(np.isfinite(ours), np.isfinite(theirs))
  keep = np.isfinite(theirs)
  np.testing.assert_allclose(ours[keep], theirs[keep], rtol=1e-6)
  if setting[1] == 1:
    assert keep.sum() == 1 and keep[np.argmax(LOGITS)]


@pytest.mark.parametrize("setting", SETTINGS)
def test_draws_stay_in_the_allowed_set(setting):
  n = 4000
  draws = np.asarray(_draws(jnp.asarray(LOGITS), n, *setting))
  theirs = hf_scores(LOGITS[None], *setting)[0]
  allowed = np.isfinite(theirs)
  assert allowed[draws].all(), sorted(set(draws[~allowed[draws]].tolist()))
  # and they follow transformers' distribution (4000 draws: a 0.03 gap is > 4 standard errors)
  probs = torch.softmax(torch.tensor(theirs), -1).numpy()
  freq = np.bincount(draws, minlength=V) / n
  assert np.abs(freq - probs).max() < 0.03
  assert set(np.nonzero(probs > 0.01)[0]) <= set(draws.tolist())


def test_temperature_zero_is_greedy_whatever_the_filters():
  logits = jnp.asarray(np.random.default_rng(1).normal(size=(6, V)), jnp.float32)
  for seed in range(4):
    for top_k, top_p in [(0, 1.0), (3, 0.5), (1, 0.1)]:
      got = _pick(logits, jax.random.key(seed), 0.0, top_k, top_p)
      assert np.array_equal(np.asarray(got), np.argmax(np.asarray(logits), -1))


def test_same_key_same_draw_other_keys_differ():
  logits = jnp.zeros((64, V), jnp.float32)                       # uniform: draws are all noise
  a = _pick(logits, jax.random.key(7), 1.0, 20, 0.9)
  b = _pick(logits, jax.random.key(7), 1.0, 20, 0.9)
  c = _pick(logits, jax.random.key(8), 1.0, 20, 0.9)
  assert np.array_equal(np.asarray(a), np.asarray(b)) and not np.array_equal(np.asarray(a), np.asarray(c))


def test_seg_slots():
  assert seg_slots(-1, 8, 128) == 8           # default: the model's cap, today's behaviour
  assert seg_slots(0, 8, 128) == 128          # no cap: every generated token may be a [SEG]
  assert seg_slots(3, 8, 128) == 3
  with pytest.raises(UserError, match="infer.max_seg=-2"):
    seg_slots(-2, 8, 128)


def test_decoding_presets():
  c = base_config()
  assert (c.infer.temperature, c.infer.top_k, c.infer.top_p, c.infer.max_seg) == (0.0, 0, 1.0, -1)
  apply_decoding(c, "authors")
  assert (c.infer.temperature, c.infer.top_k, c.infer.top_p, c.infer.max_new_tokens, c.infer.max_seg) == \
      (0.2, 50, 1.0, 128, 0)
  assert c.infer.seed == 0
  apply_decoding(c, "greedy")
  assert (c.infer.temperature, c.infer.top_k, c.infer.top_p, c.infer.max_seg) == (0.0, 0, 1.0, -1)
  assert set(DECODING_PRESETS) == {"greedy", "authors"}
  with pytest.raises(ValueError, match="beam"):
    apply_decoding(c, "beam")


# ------------------------------------------------------------------------------ through generate, tiny Phi
T = 6
B = 8


@pytest.fixture(scope="module")
def tiny():
  hf = hf_tiny_phi(**SHAPES["odd_rotary"])
  with torch.no_grad():
    hf.lm_head.weight.mul_(15.0)            # a peaked next-token distribution, so the filters bite
  model, params = ours_from_hf(hf)
  prompt = np.random.default_rng(0).integers(0, 96, (B, 5))
  return hf, model, params, prompt


def _hf_step_scores(hf, prompt, tokens, setting):
  """transformers' sampling scores of every generated position, teacher-forced: [B, T, vocab]."""
  seq = torch.tensor(np.concatenate([prompt, tokens], 1))
  with torch.no_grad():
    logits = hf(seq).logits[:, prompt.shape[1] - 1:-1].numpy()
  b, t, v = logits.shape
  return hf_scores(logits.reshape(b * t, v), *setting).reshape(b, t, v), logits


@pytest.mark.parametrize("setting", [(1.5, 3, 1.0), (1.0, 0, 0.5), (2.0, 5, 0.7)])
def test_generate_samples_inside_transformers_allowed_set(tiny, setting):
  hf, model, params, prompt = tiny
  temperature, top_k, top_p = setting
  not_greedy = 0
  for seed in range(3):
    out = generate(model, params, input_ids=prompt, prompt_len=np.full(B, prompt.shape[1]), max_new_tokens=T,
                   eos_id=-1, seg_id=-1, max_seg=1, temperature=temperature, top_k=top_k, top_p=top_p,
                   rng=jax.random.key(seed))
    tokens = np.asarray(out["tokens"])
    scores, logits = _hf_step_scores(hf, prompt, tokens, setting)
    picked = np.take_along_axis(scores, tokens[..., None], -1)[..., 0]
    assert np.isfinite(picked).all()
    not_greedy += int((tokens != logits.argmax(-1)).sum())
  assert not_greedy > 0                     # it did sample: the check above is not the greedy path's


def test_generate_seeds_and_greedy_without_recompiles(tiny):
  hf, model, params, prompt = tiny
  run = functools.partial(generate, model, params, input_ids=prompt, prompt_len=np.full(B, prompt.shape[1]),
                          max_new_tokens=T, eos_id=-1, seg_id=-1, max_seg=1)
  greedy = np.asarray(run()["tokens"])
  with torch.no_grad():
    hf_greedy = hf.generate(torch.tensor(prompt), max_new_tokens=T, do_sample=False, eos_token_id=None,
                            pad_token_id=0)[:, prompt.shape[1]:].numpy()
  assert np.array_equal(greedy, hf_greedy)
  compiles = generate_lib._generate._cache_size()
  assert np.array_equal(np.asarray(run(temperature=0.0, top_k=3, top_p=0.5, rng=jax.random.key(5))["tokens"]),
                        greedy)
  a = np.asarray(run(temperature=1.0, top_k=10, top_p=0.9, rng=jax.random.key(1))["tokens"])
  b = np.asarray(run(temperature=1.0, top_k=10, top_p=0.9, rng=jax.random.key(1))["tokens"])
  c = np.asarray(run(temperature=1.0, top_k=10, top_p=0.9, rng=jax.random.key(2))["tokens"])
  d = np.asarray(run(temperature=0.3, top_k=4, top_p=0.8, rng=jax.random.key(3))["tokens"])
  assert np.array_equal(a, b) and not np.array_equal(a, c) and d.shape == a.shape
  # seeds, temperature, top_k and top_p are traced: no compile beyond the first
  assert generate_lib._generate._cache_size() == compiles


def test_no_cap_returns_every_generated_seg(tiny):
  prompt = tiny[3]
  hf = hf_tiny_phi(**SHAPES["odd_rotary"])
  seg = 17
  with torch.no_grad():
    hf.lm_head.bias[seg] += 100.0           # [SEG] is every step's argmax
  model, params = ours_from_hf(hf)
  plen = np.full(B, prompt.shape[1])
  run = functools.partial(generate, model, params, input_ids=prompt, prompt_len=plen, max_new_tokens=T,
                          eos_id=-1, seg_id=seg)
  free = run(max_seg=seg_slots(0, 2, T))
  capped = run(max_seg=seg_slots(-1, 2, T))
  assert (np.asarray(free["tokens"]) == seg).all()
  assert free["seg_valid"].shape == (B, T) and np.asarray(free["seg_valid"]).all()
  assert capped["seg_valid"].shape == (B, 2) and np.asarray(capped["seg_valid"]).all()
  # each slot holds the final hidden state of its [SEG], as transformers computes it
  seq = torch.tensor(np.concatenate([prompt, np.asarray(free["tokens"])], 1))
  with torch.no_grad():
    hidden = hf.model(seq).last_hidden_state[:, prompt.shape[1]:].numpy()
  np.testing.assert_allclose(np.asarray(free["seg_hidden"]), hidden, atol=1e-4)
  np.testing.assert_allclose(np.asarray(capped["seg_hidden"]), hidden[:, :2], atol=1e-4)
