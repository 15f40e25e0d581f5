"""The grain pipeline: batch contract, seeded order, disjoint per-process shards, exact resume, eval padding,
the [SEG] cap, and global jax.Array batches."""
import logging

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from segearth_jax import experiment, sharding
from segearth_jax.data.batch import HOST_ONLY, device_part, dummy_batch, global_batch
from segearth_jax.data.pipeline import make_dataset
from segearth_jax.data import templates
from segearth_jax.data.preprocess import Preprocessor, mask_grid_authors, trim_to_bucket
from segearth_jax.data.tokenizer import image_token_id, seg_token_id, train_toy_tokenizer
from segearth_jax.errors import UserError
from tests import native_fixtures as nf
from tfds_laserss.build import build

N = 12


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("pipe")
  records = nf.write_laserss_many(root / "src", n=N)
  build("laserss", root / "src", root / "tfds")
  c = experiment.base_config("tiny")
  texts = [templates.PHI_SYSTEM, templates.TRAIN_PROMPT, templates.EVAL_PROMPT, "USER ASSISTANT"]
  texts += [r["description"] + " " + r["answer"] for s in records.values() for r in s.values()]
  tok = train_toy_tokenizer(texts, root / "tok", vocab_size=1024)
  c.data.data_dir = str(root / "tfds")
  c.data.tokenizer = str(root / "tok")
  c.model.vision.image_size, c.model.vision.patch_size = 28, 14
  c.model.swin.image_size = 32
  c.model.max_seg = 2
  c.data.text_buckets = (96, 192, 384)
  c.data.max_len = 384
  c.train.batch_size = 4
  return c, tok, records


def _take(ds, k):
  it = iter(ds)
  return [next(it) for _ in range(k)]


def test_batch_contract(setup):
  c, tok, records = setup
  (b,) = _take(make_dataset(c, "train", tokenizer=tok, train=True, process_index=0, process_count=1), 1)
  B, S, M, K, G = 4, 28, 32, 2, 2
  L = b["input_ids"].shape[1]
  assert L == min(x for x in c.data.text_buckets if x >= b["attention_mask"].sum(1).max())
  want = dict(siglip_image=((B, S, S, 3), np.float32), swin_image=((B, M, M, 3), np.float32),
              input_ids=((B, L), np.int32), attention_mask=((B, L), np.int32), labels=((B, L), np.int32),
              image_start=((B,), np.int32), seg_positions=((B, K), np.int32), seg_valid=((B, K), np.bool_),
              masks=((B, K, M, M), np.uint8), mask_grid=((B, K, G, G), np.float32),
              letterbox=((B, 4), np.int32), sample_valid=((B,), np.bool_))
  for k, (shape, dtype) in want.items():
    assert b[k].shape == shape and b[k].dtype == dtype, (k, b[k].shape, b[k].dtype)
  assert b["example_id"].shape == (B,) and b["example_id"].dtype.kind == "U"
  seg, img = seg_token_id(tok), image_token_id(tok)
  for r in range(B):
    ids, lab, am = b["input_ids"][r], b["labels"][r], b["attention_mask"][r]
    n = int(am.sum())
    assert am[:n].all() and not am[n:].any()
    st = b["image_start"][r]
    assert (ids == img).sum() == G * G and (ids[st:st + G * G] == img).all()
    # labels: exactly the answer tokens (a suffix of the real tokens, ending with eos), -100 elsewhere
    on = np.nonzero(lab != -100)[0]
    assert len(on) > 0 and on[-1] == n - 1 and (np.diff(on) == 1).all() and on[0] > st + G * G
    np.testing.assert_array_equal(lab[on], ids[on])
    assert ids[n - 1] == tok.eos_token_id
    rec = records["train"][b["example_id"][r]]
    n_t = min(len(rec["mask"]), K)
    assert b["seg_valid"][r].sum() == n_t
    assert (ids[b["seg_positions"][r][:n_t]] == seg).all() and (b["seg_positions"][r][n_t:] == 0).all()
    assert (b["masks"][r][n_t:] == 0).all() and (b["mask_grid"][r][n_t:] == 0).all()
    # the letterbox: longest side -> M, the rest is pad (128 before ImageNet normalisation)
    h, w, rh, rw = b["letterbox"][r]
    assert max(rh, rw) == M and (h, w) in ((40, 40), (32, 48))
    pad_val = (128 / 255 - 0.485) / 0.229
    if rh < M:
      np.testing.assert_allclose(b["swin_image"][r, rh:, :, 0], pad_val, rtol=1e-5)
    assert b["siglip_image"].min() >= -1 and b["siglip_image"].max() <= 1
    if n_t:  # the grid is the max-pool of the nearest-resized mask
      from PIL import Image
      from pycocotools import mask as mu
      m = mu.decode({"size": rec["mask"][0]["size"], "counts": rec["mask"][0]["counts"].encode()})
      big = np.asarray(Image.fromarray(m).resize((S, S), Image.NEAREST))
      np.testing.assert_array_equal(b["mask_grid"][r, 0], big.reshape(G, 14, G, 14).max((1, 3)))
      assert b["masks"][r, 0].sum() > 0 and (b["masks"][r, 0][rh:] == 0).all()


def test_seed_determinism(setup):
  c, tok, _ = setup

  def ids(seed):
    ds = make_dataset(c, "train", tokenizer=tok, train=True, process_index=0, process_count=1, seed=seed)
    return [list(b["example_id"]) for b in _take(ds, 3)]

  a, a2, other = ids(1), ids(1), ids(2)
  assert a == a2 and a != other
  assert sorted(sum(a, [])) == sorted(f"train{i}" for i in range(N))  # 3 batches of 4 = one epoch


def test_shards_disjoint_and_cover(setup):
  c, tok, _ = setup
  shards = []
  for p in range(2):  # batch 4 over 2 processes: 2 per process, 3 batches = half an epoch each
    ds = make_dataset(c, "train", tokenizer=tok, train=True, process_index=p, process_count=2, seed=3)
    batches = _take(ds, 3)
    assert all(b["input_ids"].shape[0] == 2 for b in batches)
    shards.append({i for b in batches for i in b["example_id"]})
  assert not shards[0] & shards[1]
  assert shards[0] | shards[1] == {f"train{i}" for i in range(N)}


def test_resume_exact(setup):
  c, tok, _ = setup
  ds = make_dataset(c, "train", tokenizer=tok, train=True, process_index=0, process_count=1, seed=5)
  it = iter(ds)
  for _ in range(2):
    next(it)
  state = it.get_state()
  want = [next(it) for _ in range(4)]  # crosses the epoch boundary (3 batches per epoch)
  it2 = iter(make_dataset(c, "train", tokenizer=tok, train=True, process_index=0, process_count=1, seed=5))
  it2.set_state(state)
  got = [next(it2) for _ in range(4)]
  for w, g in zip(want, got):
    assert w.keys() == g.keys()
    for k in w:
      np.testing.assert_array_equal(w[k], g[k], err_msg=k)


def test_eval_padding_and_prompt(setup):
  c, tok, records = setup
  c = c.copy_and_resolve_references()
  c.train.batch_size = 5
  # 12 records in batches of 5: the third batch holds 2 real rows and 3 padding rows
  batches = list(make_dataset(c, "test", tokenizer=tok, train=False, process_index=0, process_count=1))
  assert len(batches) == 3
  valid = np.concatenate([b["sample_valid"] for b in batches])
  assert valid.sum() == N and not valid[N:].any()
  seen = [i for b in batches for i, v in zip(b["example_id"], b["sample_valid"]) if v]
  assert sorted(seen) == sorted(records["test"])
  # two processes: the same number of batches each, the real rows cover the split once
  c.train.batch_size = 4
  per = [list(make_dataset(c, "test", tokenizer=tok, train=False, process_index=p, process_count=2))
         for p in range(2)]
  assert len(per[0]) == len(per[1]) == 3
  ids = [i for bs in per for b in bs for i, v in zip(b["example_id"], b["sample_valid"]) if v]
  assert sorted(ids) == sorted(records["test"])
  b = batches[0]
  assert (b["labels"] == -100).all()
  for r in range(5):
    n = int(b["attention_mask"][r].sum())
    assert n == b["prompt_len"][r]
    assert tok.decode(b["input_ids"][r][:n]).endswith("ASSISTANT:")
    assert b["answer"][r] == records["test"][b["example_id"][r]]["answer"]
    assert b["subsets"][r] == "single"
    assert b["seg_valid"][r].sum() == min(2, len(records["test"][b["example_id"][r]]["mask"]))


def test_seg_cap_counted(setup, caplog):
  c, tok, _ = setup
  src = tfds.data_source("laserss", split="train", data_dir=c.data.data_dir)
  pre = Preprocessor(c, tok, train=True)
  with caplog.at_level(logging.WARNING):
    outs = [pre(src[i]) for i in range(len(src))]
  over = sum(1 for i in range(len(src)) if len(src[i]["masks"]) > 2)
  assert over == 3 and pre.stats["seg_capped"] == over
  assert sum("capped" in r.message for r in caplog.records) == 1  # logged once, not per example
  assert all(o["seg_valid"].sum() <= 2 for o in outs)


def test_authors_ls_grid(setup):
  """loss.ls_target='authors': mask_grid is the authors' patch-centre grid of each target mask."""
  from pycocotools import mask as mu
  c, tok, records = setup
  c = c.copy_and_resolve_references()
  c.loss.ls_target = "authors"
  src = tfds.data_source("laserss", split="train", data_dir=c.data.data_dir)
  pre = Preprocessor(c, tok, train=True)
  for i in range(4):
    out = pre(src[i])
    rec = records["train"][str(out["example_id"])]
    for k in range(int(out["seg_valid"].sum())):
      m = mu.decode({"size": rec["mask"][k]["size"], "counts": rec["mask"][k]["counts"].encode()})
      np.testing.assert_array_equal(out["mask_grid"][k], mask_grid_authors(m, 2))
  c.loss.ls_target = "everywhere"
  with pytest.raises(UserError, match="ls_target"):
    Preprocessor(c, tok, train=True)


def test_text_cut_counted(setup):
  c, tok, _ = setup
  c = c.copy_and_resolve_references()
  pre = Preprocessor(c, tok, train=True)
  c.data.max_len = pre.fixed_len + 3
  c.data.text_buckets = (c.data.max_len,)
  pre = Preprocessor(c, tok, train=True)
  ex = tfds.data_source("laserss", split="train", data_dir=c.data.data_dir)[0]
  out = pre(ex)
  assert pre.stats["text_cut"] == 1 and out["length"] == c.data.max_len


def test_global_batch(setup):
  c, tok, _ = setup
  (b,) = _take(make_dataset(c, "train", tokenizer=tok, train=True, process_index=0, process_count=1), 1)
  mesh = sharding.make_mesh(data=1, fsdp=4, tensor=1, devices=jax.devices()[:4])
  g = global_batch(b, lambda ndim: sharding.batch_sharding(mesh, ndim))
  assert isinstance(g["input_ids"], jax.Array) and g["input_ids"].shape == b["input_ids"].shape
  assert len(g["masks"].sharding.device_set) == 4
  np.testing.assert_array_equal(np.asarray(g["masks"]), b["masks"])
  assert isinstance(g["example_id"], np.ndarray)
  # an eval batch: every host-only field stays numpy, the numeric ones (prompt_len too) become jax.Arrays
  (e,) = _take(make_dataset(c, "test", tokenizer=tok, train=False, process_index=0, process_count=1), 1)
  g = global_batch(e, lambda ndim: sharding.batch_sharding(mesh, ndim))
  assert set(HOST_ONLY) <= set(g) and all(isinstance(g[k], np.ndarray) for k in HOST_ONLY)
  assert isinstance(g["prompt_len"], jax.Array)


def test_dummy_batch_matches_the_pipeline(setup):
  """dummy_batch (init, AOT, benchmarks) has the keys, dtypes and shapes of a real preprocessed batch."""
  c, tok, _ = setup
  src = tfds.data_source("laserss", split="train", data_dir=c.data.data_dir)
  pre = Preprocessor(c, tok, train=True)
  rows = [pre(src[i]) for i in range(3)]
  real = trim_to_bucket({k: np.stack([r[k] for r in rows]) for k in rows[0]}, c.data.text_buckets)
  assert set(HOST_ONLY) & set(real) == {"example_id"}
  want = {k: v for k, v in real.items() if k not in HOST_ONLY}
  dummy = dummy_batch(c, 3, real["input_ids"].shape[1])
  assert sorted(dummy) == sorted(want) == sorted(device_part(real))
  for k, v in want.items():
    assert (dummy[k].shape, dummy[k].dtype) == (v.shape, v.dtype), k
  # without a length: the longest bucket; the one [SEG] slot lies inside the text
  full = dummy_batch(c, 2)
  assert full["input_ids"].shape == (2, max(c.data.text_buckets))
  assert 0 < full["seg_positions"][0, 0] < max(c.data.text_buckets)


def test_worker_processes_same_batches(setup):
  """data.workers > 0 runs preprocessing in grain worker processes; the batches are the in-process ones."""
  c, tok, _ = setup
  cw = c.copy_and_resolve_references()
  cw.data.workers = 1
  ref = _take(make_dataset(c, "train", tokenizer=tok, train=True, process_index=0, process_count=1), 2)
  it = iter(make_dataset(cw, "train", tokenizer=tok, train=True, process_index=0, process_count=1))
  got = [next(it) for _ in range(2)]
  it.close()
  for w, g in zip(ref, got):
    for k in w:
      np.testing.assert_array_equal(w[k], g[k], err_msg=k)
