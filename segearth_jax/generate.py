"""KV-cache generation under jit: greedy or sampled (temperature, top-k, top-p), per-row EOS, [SEG] hidden states.

Prompts are right-padded to a bucket P (row b's real tokens at slots 0..prompt_len[b]-1). The cache has
P + max_new_tokens slots; generated token t of row b goes to slot prompt_len[b] + t, overwriting the
prompt's padding, so every row's tokens stay contiguous and need no left padding.

A [SEG] token's final hidden state exists only once the token has been fed back as input, so every
generated token (including the last one) is fed; the step that feeds a [SEG] records its hidden state
(after the final LayerNorm) into the row's next [SEG] slot, while slots are left (``max_seg`` of them).

Decoding: temperature 0 is greedy (argmax, deterministic). Temperature > 0 samples from transformers'
warpers in their order: scores / temperature, then top-k (``top_k`` > 0: drop scores below the k-th
largest, ties kept), then top-p (``top_p`` < 1: sort ascending, drop the tokens whose cumulative
probability is <= 1 - top_p, always keeping the most likely one). Step t's key is fold_in(rng, t).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from segearth_jax.errors import UserError
from segearth_jax.models.phi import Phi, init_cache


def seg_slots(max_seg: int, model_max_seg: int, max_new_tokens: int) -> int:
  """The number of [SEG] slots generation fills (``infer.max_seg``): -1 = the model's ``max_seg`` (the
  default), 0 = no cap (``max_new_tokens`` slots: every generated token may be a [SEG]), n > 0 = n."""
  max_seg = int(max_seg)
  if max_seg < -1:
    raise UserError(f"infer.max_seg={max_seg}: -1 (model.max_seg), 0 (no cap) or a positive [SEG] count")
  return int(model_max_seg) if max_seg == -1 else int(max_new_tokens) if max_seg == 0 else max_seg


def filter_logits(logits, temperature, top_k, top_p):
  """logits [B, V] -> float32 scores [B, V] of the sampling distribution: temperature, top-k, top-p as
  transformers applies them (removed tokens -inf). top_k <= 0 and top_p >= 1 turn a filter off; all three
  may be traced (one compile for any values). Needs temperature > 0."""
  scores = logits.astype(jnp.float32) / temperature
  v = scores.shape[-1]
  order = jnp.argsort(scores, axis=-1)                           # ascending, as transformers' top-p sorts
  ranked = jnp.take_along_axis(scores, order, axis=-1)
  k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
  kth = jax.lax.dynamic_index_in_dim(ranked, v - k, axis=-1, keepdims=True)   # the k-th largest
  ranked = jnp.where(ranked < kth, -jnp.inf, ranked)
  # top-p on the top-k survivors; the sort order is unchanged by top-k, so one sort serves both
  cumulative = jnp.cumsum(jax.nn.softmax(ranked, axis=-1), axis=-1)
  drop = (cumulative <= 1 - top_p) & (top_p < 1)
  drop = drop.at[:, -1].set(False)                               # min_tokens_to_keep = 1
  ranked = jnp.where(drop, -jnp.inf, ranked)
  return jnp.put_along_axis(scores, order, ranked, axis=-1, inplace=False)


def pick_tokens(logits, key, temperature, top_k=0, top_p=1.0):
  """logits [B, V] -> token ids [B] int32: argmax when temperature <= 0, else a sample of filter_logits."""
  temperature = jnp.asarray(temperature, jnp.float32)

  def sample(logits):
    scores = filter_logits(logits, jnp.maximum(temperature, 1e-6), top_k, top_p)
    return jax.random.categorical(key, scores, axis=-1).astype(jnp.int32)

  def greedy(logits):
    return jnp.argmax(logits, -1).astype(jnp.int32)

  # a real branch: greedy decoding pays no sort
  return jax.lax.cond(temperature > 0, sample, greedy, logits)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "max_seg"))
def _generate(model: Phi, params, prompt_embeds, prompt_len, eos_id, seg_id, temperature, top_k, top_p, rng, *,
              max_new_tokens: int, max_seg: int):
  b, p, d = prompt_embeds.shape
  T = max_new_tokens
  prompt_len = prompt_len.astype(jnp.int32)
  variables = {"params": params}
  pick = functools.partial(pick_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
  cache = init_cache(model.config, b, p + T, dtype=prompt_embeds.dtype)
  mask = (jnp.arange(p)[None] < prompt_len[:, None]).astype(jnp.int32)
  out = model.apply(variables, prompt_embeds, mask, cache=cache)
  last = jnp.take_along_axis(out["logits"], (prompt_len - 1)[:, None, None], axis=1)[:, 0]
  tok0 = pick(last, jax.random.fold_in(rng, 0))

  state = dict(
      t=jnp.int32(0), tok=tok0, cache=out["cache"],
      tokens=jnp.full((b, T), eos_id, jnp.int32).at[:, 0].set(tok0),
      lengths=jnp.ones((b,), jnp.int32),
      active=jnp.ones((b,), bool),                      # row generated tokens[:, t] and is not finished
      seg_hidden=jnp.zeros((b, max_seg, d), out["hidden"].dtype),
      seg_count=jnp.zeros((b,), jnp.int32))

  def cond(s):
    return (s["t"] < T) & s["active"].any()

  def body(s):
    t, tok = s["t"], s["tok"]
    cache = dict(s["cache"], index=prompt_len + t)
    emb = model.apply(variables, tok[:, None], method=Phi.embed)
    o = model.apply(variables, emb, jnp.ones((b, 1), jnp.int32), cache=cache)
    h = o["hidden"][:, 0]
    is_seg = s["active"] & (tok == seg_id) & (s["seg_count"] < max_seg)
    slot = jax.nn.one_hot(jnp.minimum(s["seg_count"], max_seg - 1), max_seg, dtype=bool) & is_seg[:, None]
    seg_hidden = jnp.where(slot[:, :, None], h[:, None, :], s["seg_hidden"])
    nxt = pick(o["logits"][:, 0], jax.random.fold_in(rng, t + 1))
    go_on = s["active"] & (tok != eos_id) & (t + 1 < T)
    tokens = jnp.where(go_on[:, None] & (jnp.arange(T)[None] == t + 1), nxt[:, None], s["tokens"])
    return dict(t=t + 1, tok=nxt, cache=o["cache"], tokens=tokens,
                lengths=jnp.where(go_on, t + 2, s["lengths"]), active=go_on,
                seg_hidden=seg_hidden, seg_count=s["seg_count"] + is_seg.astype(jnp.int32))

  s = jax.lax.while_loop(cond, body, state)
  return dict(tokens=s["tokens"], lengths=s["lengths"], seg_hidden=s["seg_hidden"],
              seg_valid=jnp.arange(max_seg)[None] < s["seg_count"][:, None])


def generate(model: Phi, params, prompt=None, prompt_len=None, *, input_ids=None, inputs_embeds=None,
             max_new_tokens: int, eos_id: int, seg_id: int, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, rng=None, max_seg: int = 4) -> dict:
  """Decode up to ``max_new_tokens`` after each row's prompt (callable inside an outer jit).

  ``prompt``: ids [B, P] (int) or embeddings [B, P, D] (e.g. with image features spliced in), right-padded;
  or pass ``input_ids`` / ``inputs_embeds`` by name. ``prompt_len`` [B]. ``temperature`` 0 = greedy;
  ``top_k`` 0 / ``top_p`` 1.0 = off (see the module docstring); ``rng`` a PRNG key (the sampling seed).
  ``max_seg``: [SEG] slots, static (max_new_tokens = no cap; a [SEG] past the slots is generated but
  yields no hidden state). Returns tokens [B, T] (eos_id after each row's end), lengths [B] (generated
  tokens, EOS included), seg_hidden [B, max_seg, D], seg_valid [B, max_seg]. One compile per (model,
  shapes, max_new_tokens, max_seg); eos/seg ids, temperature, top_k, top_p and rng are traced values.
  """
  if prompt is not None:
    if input_ids is not None or inputs_embeds is not None:
      raise ValueError("pass the prompt once: positionally or as input_ids / inputs_embeds")
    if jnp.ndim(prompt) == 3:
      inputs_embeds = prompt
    else:
      input_ids = prompt
  if (input_ids is None) == (inputs_embeds is None):
    raise ValueError("pass exactly one of input_ids / inputs_embeds")
  if prompt_len is None:
    raise ValueError("prompt_len [B] is required")
  if inputs_embeds is None:
    inputs_embeds = model.apply({"params": params}, jnp.asarray(input_ids), method=Phi.embed)
  rng = jax.random.PRNGKey(0) if rng is None else rng
  return _generate(model, params, inputs_embeds, jnp.asarray(prompt_len), jnp.int32(eos_id), jnp.int32(seg_id),
                   jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p), rng,
                   max_new_tokens=max_new_tokens, max_seg=max_seg)
