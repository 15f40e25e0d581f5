"""JAX predict vs the exported PyTorch SegEarthR2Torch.segment on a tiny random model (LoRA as a PEFT adapter)."""
import os

import jax
import numpy as np
import pytest

from train_fixtures import tiny_config

from segearth_jax import sharding as shd
from segearth_jax.convert.checkpoint import export_torch
from segearth_jax.convert.torch_model import SegEarthR2Torch
from segearth_jax.data.batch import device_part
from segearth_jax.data.preprocess import trim_to_bucket
from segearth_jax.data.tokenizer import seg_token_id, train_toy_tokenizer
from segearth_jax.data.templates import EVAL_PROMPT, PHI_SYSTEM
from segearth_jax.experiment import apply_decoding
from segearth_jax.generate import generate
from segearth_jax.model_setup import ModelSetup
from segearth_jax.models.mllm import make_llm
from segearth_jax.predict import Predictor
from segearth_jax.weights import load_params, load_run_config, save_weights

INSTRUCTION = "segment the ships near the harbour"
MAX_NEW = 6


def make_tokenizer(out_dir):
  texts = [PHI_SYSTEM, EVAL_PROMPT, INSTRUCTION, "USER: ASSISTANT:", "the <p>ship</p>[SEG] and the road"]
  return train_toy_tokenizer(texts * 3, out_dir, vocab_size=400)


def steer(params, tok, rng):
  """Makes greedy decoding of the random model emit [SEG] A [SEG] A ...: the [SEG] embedding points along
  u and A's along w (both large), lm_head maps u -> A and w -> [SEG], and [SEG] has a high bias, so the
  first token is [SEG] too. Random LoRA B so the adapter matters."""
  llm = params["llm"]
  seg = seg_token_id(tok)
  a = tok.encode(" ship", add_special_tokens=False)[0]
  d = llm["embed_tokens"]["embedding"].shape[1]
  u, w = rng.normal(size=d), rng.normal(size=d)
  u -= u.mean()
  w -= w.mean()
  w -= u * (u @ w) / (u @ u)
  u, w = u / np.linalg.norm(u), w / np.linalg.norm(w)
  emb = np.array(llm["embed_tokens"]["embedding"])
  emb[seg], emb[a] = 50 * u, 50 * w
  k = np.array(llm["lm_head"]["kernel"])
  k[:, a], k[:, seg] = 3 * u, 3 * w
  b = np.array(llm["lm_head"]["bias"])
  b[seg] = 12.0
  llm["embed_tokens"]["embedding"], llm["lm_head"]["kernel"], llm["lm_head"]["bias"] = emb, k, b
  attn = llm["layers"]["self_attn"]
  for t in ("q_proj", "v_proj"):
    lb = attn[t]["lora"]["b"]
    attn[t]["lora"]["b"] = (0.05 * rng.normal(size=lb.shape)).astype(lb.dtype)
  return seg, a


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("export")
  tok = make_tokenizer(str(tmp / "tok"))
  config = tiny_config(f"--config.data.tokenizer={tmp / 'tok'}", f"--config.infer.max_new_tokens={MAX_NEW}",
                       "--config.data.text_buckets=(192,)", "--config.data.max_len=192")
  mesh = shd.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  setup = ModelSetup.create(config, mesh=mesh, vocab_size=len(tok))
  params = jax.tree.map(lambda x: np.array(jax.device_get(x)), setup.init_params(0))
  seg, a = steer(params, tok, np.random.default_rng(0))
  W = str(tmp / "weights")
  save_weights(params, config, W, tok)
  out = str(tmp / "torch")
  export_torch(load_params(W), config, os.path.join(W, "tokenizer"), out)
  return dict(config=config, params=params, W=W, out=out, seg=seg, a=a, tok=tok)


def test_weights_folder_round_trip(exported):
  back = load_params(exported["W"])
  flat = jax.tree_util.tree_leaves_with_path(exported["params"])
  got = dict(jax.tree_util.tree_leaves_with_path(back))
  assert len(flat) == len(got)
  for path, v in flat:
    np.testing.assert_array_equal(got[path], v)


def test_segment_matches_jax_predict(exported):
  rng = np.random.default_rng(1)
  image = rng.integers(0, 255, size=(40, 56, 3), dtype=np.uint8)   # not square: letterbox in and out
  pred = Predictor.load(exported["W"])
  ours = pred(image, INSTRUCTION)
  model = SegEarthR2Torch.from_pretrained(exported["out"])
  assert hasattr(model.llm, "peft_config")                          # LoRA came as a PEFT adapter
  theirs = model.segment(image, INSTRUCTION)

  seg, a = exported["seg"], exported["a"]
  assert ours["tokens"] == theirs["tokens"]
  assert ours["tokens"][:4] == [seg, a, seg, a]                     # the mask path is exercised twice
  assert ours["answer"] == theirs["answer"]
  assert len(ours["masks"]) == len(theirs["masks"]) == exported["config"].model.max_seg
  for m_ours, m_theirs in zip(ours["masks"], theirs["masks"]):
    assert m_ours.shape == m_theirs.shape == image.shape[:2]
    union = np.logical_or(m_ours, m_theirs).sum()
    iou = np.logical_and(m_ours, m_theirs).sum() / union if union else 1.0
    assert iou >= 0.999

  # LM logits of each generated step, teacher-forced through the JAX model, vs the torch KV-cache loop
  setup, params = pred.setup, pred.params
  ex = pred.pre(dict(id="x", image=image, masks=[], answer="", instruction=INSTRUCTION))
  batch = device_part(trim_to_bucket({k: np.asarray(v)[None] for k, v in ex.items()}, pred.pre.buckets))
  model_j = setup.model
  cfg = model_j.config
  # the steps of make_predict_fn, stopping before the threshold: mask logits of the last prediction
  mask_logits = np.asarray(_mask_logits(model_j, make_llm(cfg), params, batch, exported["tok"].eos_token_id, seg,
                                        cfg.max_seg))
  np.testing.assert_allclose(theirs["mask_logits"], mask_logits, atol=1e-3, rtol=0)

  p = int(batch["prompt_len"][0])
  ids = np.array(batch["input_ids"])
  toks = ours["tokens"]
  ids[0, p:p + len(toks)] = toks
  mask = np.zeros_like(batch["attention_mask"])
  mask[0, :p + len(toks)] = 1
  tf = dict(batch, input_ids=ids, attention_mask=mask)
  out = jax.jit(lambda prm, b: model_j.apply({"params": prm}, b, with_seg_attn=False))(params, tf)
  jax_logits = np.asarray(out["logits"][0, p - 1:p - 1 + len(toks)])
  np.testing.assert_allclose(theirs["logits"], jax_logits, atol=1e-3, rtol=0)


def _mask_logits(model_j, llm, params, batch, eos, seg, max_seg):
  @jax.jit
  def run(params, batch):
    embeds = model_j.apply({"params": params}, batch["siglip_image"], batch["input_ids"], batch["image_start"],
                           method=model_j.prompt_embeds)
    gen = generate(llm, params["llm"], inputs_embeds=embeds, prompt_len=batch["prompt_len"],
                   max_new_tokens=MAX_NEW, eos_id=eos, seg_id=seg, max_seg=max_seg)
    return model_j.apply({"params": params}, batch["swin_image"], gen["seg_hidden"], gen["seg_valid"],
                         method=model_j.masks_from_hidden)[-1][0]
  return run(params, batch)


def test_merged_lora_export_matches_adapter(exported, tmp_path):
  merged = str(tmp_path / "merged")
  export_torch(load_params(exported["W"]), exported["config"], os.path.join(exported["W"], "tokenizer"), merged,
               merge_lora=True)
  assert not os.path.exists(os.path.join(merged, "adapter"))
  a = SegEarthR2Torch.from_pretrained(exported["out"])
  b = SegEarthR2Torch.from_pretrained(merged)
  image = np.random.default_rng(2).integers(0, 255, size=(32, 32, 3), dtype=np.uint8)
  ra, rb = a.segment(image, INSTRUCTION), b.segment(image, INSTRUCTION)
  assert ra["tokens"] == rb["tokens"]
  np.testing.assert_allclose(ra["logits"], rb["logits"], atol=1e-4)


def test_authors_decoding_without_seg_cap_matches_segment(exported):
  """The authors' decoding (sampled: temperature 0.2, top-k 50; no [SEG] cap) in JAX predict and in
  segment. The steered model's [SEG] A [SEG] A ... is so peaked that both samplers follow it, so tokens and
  masks agree; MAX_NEW tokens hold 3 [SEG], more than model.max_seg (2), and all 3 get masks."""
  config = load_run_config(exported["W"])
  apply_decoding(config, "authors")
  config.infer.max_new_tokens = MAX_NEW
  pred = Predictor.load(exported["W"], config)
  image = np.random.default_rng(3).integers(0, 255, size=(48, 40, 3), dtype=np.uint8)
  ours = pred(image, INSTRUCTION)
  model = SegEarthR2Torch.from_pretrained(exported["out"])
  options = dict(temperature=0.2, top_k=50, top_p=1.0, seed=0, max_seg=0)
  theirs = model.segment(image, INSTRUCTION, **options)
  seg, a = exported["seg"], exported["a"]
  assert ours["tokens"] == theirs["tokens"] == [seg, a] * (MAX_NEW // 2)
  max_seg = exported["config"].model.max_seg
  assert len(ours["masks"]) == len(theirs["masks"]) == MAX_NEW // 2 > max_seg
  for m_ours, m_theirs in zip(ours["masks"], theirs["masks"]):
    union = np.logical_or(m_ours, m_theirs).sum()
    assert (np.logical_and(m_ours, m_theirs).sum() / union if union else 1.0) >= 0.999
  # the arrays evaluation reads carry K_gen = max_new_tokens [SEG] slots
  ex = pred.pre(dict(id="x", image=image, masks=[], answer="", instruction=INSTRUCTION))
  batch = device_part(trim_to_bucket({k: np.asarray(v)[None] for k, v in ex.items()}, pred.pre.buckets))
  out = pred.fn(pred.params, batch, pred.rng)
  assert out["seg_valid"].shape == (1, MAX_NEW) and out["masks"].shape[:2] == (1, MAX_NEW)
  assert int(out["seg_valid"].sum()) == MAX_NEW // 2
  # the default cap is model.max_seg: the same answer keeps 2 masks
  assert len(model.segment(image, INSTRUCTION, **dict(options, max_seg=-1))["masks"]) == max_seg

  # segment's sampler: top-k 1 is greedy at any temperature; a flat distribution samples inside the top-k,
  # differently per seed and the same for one seed
  greedy = model.segment(image, INSTRUCTION)["tokens"]
  assert model.segment(image, INSTRUCTION, temperature=1000.0, top_k=1, seed=4)["tokens"] == greedy
  flat = dict(temperature=1000.0, top_k=5)
  r1, r1b, r2 = (model.segment(image, INSTRUCTION, seed=s, **flat) for s in (1, 1, 2))
  assert r1["tokens"] == r1b["tokens"] and r1["tokens"] != r2["tokens"]
  for r in (r1, r2):
    fifth = np.sort(r["logits"], -1)[:, -5]
    assert (r["logits"][np.arange(len(r["tokens"])), r["tokens"]] >= fifth).all()
