"""The researcher's loop on the toy: evaluation while training (metrics.jsonl, TensorBoard, W/best that
`segearth eval` loads), evaluation on 2 processes x 4 devices == 1 process x 8 devices == 1 device,
SIGTERM + restart == uninterrupted, grad_accum=2 == the full batch."""
from __future__ import annotations

import glob
import json
import os
import signal
import struct
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from test_train_loop import _env, _free_port, _losses, _train_cmd
from train_fixtures import REPO, TINY_OVERRIDES, random_batch, tiny_config

STEPS = 6
EVAL_EVERY = 3
EVAL_EXAMPLES = 5        # of the toy's 9 val records: a fixed slice, one batch
LOSS_KEYS = ("loss", "text", "bce", "dice", "ls")


def _overrides(ds, *extra):
  return TINY_OVERRIDES + [
      f"--config.data.data_dir={ds['data_dir']}", f"--config.data.tokenizer={ds['tokenizer']}",
      f"--config.train.steps={STEPS}", "--config.loss.lambda_s=0.1", "--config.train.lr=3e-3",
      "--config.infer.max_new_tokens=12", *extra]


def _eval_overrides(ds):
  return _overrides(ds, f"--config.train.eval_every={EVAL_EVERY}", f"--config.train.eval_examples={EVAL_EXAMPLES}",
                    "--config.train.ckpt_every=3")


def _records(workdir, kind):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return [r for r in rows if r.get("kind") == kind]


def _tb_scalars(workdir) -> dict:
  """{tag: {step: value}} from the TensorBoard event files (TFRecord framing, tensorboardX's protos)."""
  from tensorboardX.proto import event_pb2
  out = {}
  for path in glob.glob(os.path.join(workdir, "tb", "events.*")):
    data = open(path, "rb").read()
    pos = 0
    while pos < len(data):
      (n,) = struct.unpack("<Q", data[pos:pos + 8])
      ev = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
      pos += 12 + n + 4
      for v in ev.summary.value:
        out.setdefault(v.tag, {})[ev.step] = v.simple_value
  return out


@pytest.fixture(scope="module")
def trained(toy_dataset, tmp_path_factory):
  """In process (the tests' 8 CPU devices): 6 steps, an evaluation every 3 on the first 5 val records."""
  from segearth_jax import train as train_lib
  from segearth_jax.config import load_config

  wd = tmp_path_factory.mktemp("eval_run")
  config = load_config(os.path.join(REPO, "experiments", "toy.py"), _eval_overrides(toy_dataset))
  t0 = time.time()
  summary = train_lib.train(config, str(wd))
  assert summary["steps"] == STEPS
  return dict(workdir=str(wd), config=config, seconds=time.time() - t0)


def test_eval_while_training_logs_val_metrics_and_keeps_the_best(trained, toy_dataset):
  from segearth_jax.checkpointing import Checkpointer
  from segearth_jax.data.tokenizer import load_tokenizer
  from segearth_jax.evaluate import evaluate
  from segearth_jax.model_setup import ModelSetup
  from segearth_jax.optim import split_params
  from segearth_jax.weights import restore_params

  wd, config = trained["workdir"], trained["config"]
  train_rows = _records(wd, "train")
  assert [r["step"] for r in train_rows] == list(range(1, STEPS + 1))
  evals = _records(wd, "eval")
  assert [r["step"] for r in evals] == [EVAL_EVERY, 2 * EVAL_EVERY]
  val_ids = [a["id"] for a in json.load(open(os.path.join(toy_dataset["manual_dir"], "val", "annotations",
                                                          "val_ann.json")))]
  assert len(val_ids) > EVAL_EXAMPLES
  for r in evals:
    assert r["split"] == "val" and r["examples"] == EVAL_EXAMPLES
    assert r["overall"]["units"] > 0 and 0.0 <= r["overall"]["gIoU"] <= 1.0
  assert os.path.isfile(os.path.join(wd, "loss.png"))     # the loss plot reads the train records only
  tb = _tb_scalars(wd)
  assert set(tb["val/gIoU"]) == {EVAL_EVERY, 2 * EVAL_EVERY}
  assert tb["val/gIoU"][EVAL_EVERY] == pytest.approx(evals[0]["overall"]["gIoU"], abs=1e-6)
  per_subset = {tag for tag in tb if tag.startswith("val/") and tag.count("/") == 2}
  assert per_subset == {f"val/{name}/{m}" for name in evals[0]["subsets"] for m in ("gIoU", "cIoU")}

  # W/best: the step with the highest val gIoU, a workdir of its own; W still loads the latest step
  best_dir = os.path.join(wd, "best")
  best_value = max(r["overall"]["gIoU"] for r in evals)
  kept = sorted(int(s) for s in os.listdir(os.path.join(best_dir, "checkpoints")) if s.isdigit())
  assert len(kept) == 1
  best_step = kept[0]
  assert next(r for r in evals if r["step"] == best_step)["overall"]["gIoU"] == best_value
  tok = load_tokenizer(toy_dataset["tokenizer"])
  setup = ModelSetup.create(config, vocab_size=len(tok))
  params, step = restore_params(setup, best_dir)
  assert step == best_step
  _, latest = restore_params(setup, wd)
  assert latest == STEPS
  ck = Checkpointer(wd, async_save=False)
  at_best = ck.restore_params(best_step, split_params(setup.abstract_params, config.train.trainable)[0])
  ck.close()
  trained_part = split_params(params, config.train.trainable)[0]
  assert all(np.array_equal(np.asarray(a), np.asarray(b))
             for a, b in zip(jax.tree.leaves(trained_part), jax.tree.leaves(at_best)))
  # what `segearth eval --workdir W/best` scores on that slice is what training logged at that step
  again = evaluate(setup, params, tok, "val", max_examples=EVAL_EXAMPLES)
  assert again["overall"] == next(r for r in evals if r["step"] == best_step)["overall"]
  ids = [x["id"] for x in again["records"]]   # the split's first records in its TFDS order
  assert len(set(ids)) == EVAL_EXAMPLES and set(ids) <= set(val_ids)


def test_two_processes_evaluate_like_one_and_like_one_device(trained, toy_dataset):
  """`segearth eval --workdir W/best` on 2 processes x 4 CPU devices == 1 process x 8 devices == 1 device:
  the same per-record entries and exactly the same sums per subset, no-target and past-the-cap records
  included (infer.max_seg=1: every record with 2+ targets is past the [SEG] cap)."""
  from segearth_jax import sharding as shd
  from segearth_jax.config import load_config
  from segearth_jax.data.tokenizer import load_tokenizer
  from segearth_jax.evaluate import evaluate
  from segearth_jax.model_setup import ModelSetup
  from segearth_jax.weights import restore_params

  best_dir = os.path.join(trained["workdir"], "best")
  ov = _overrides(toy_dataset, "--config.infer.max_seg=1")
  port = _free_port()
  procs = []
  for pid in range(2):
    dist = ["--config.distributed.enabled=True", f"--config.distributed.coordinator_address=127.0.0.1:{port}",
            "--config.distributed.num_processes=2", f"--config.distributed.process_id={pid}"]
    cmd = [sys.executable, "-m", "segearth_jax", "eval", "--config", os.path.join(REPO, "experiments", "toy.py"),
           "--workdir", best_dir, "--split", "test", *ov, *dist]
    procs.append(subprocess.Popen(cmd, env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  outs = [p.communicate(timeout=900) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  assert "| **overall** |" in outs[0][0] and "| **overall** |" not in outs[1][0]   # process 0 reports
  two = json.load(open(os.path.join(best_dir, "eval", "test.json")))

  config = load_config(os.path.join(REPO, "experiments", "toy.py"), ov)
  tok = load_tokenizer(toy_dataset["tokenizer"])
  results = []
  for mesh in (None, shd.single_device_mesh()):   # 1 process x 8 devices, then 1 device
    setup = ModelSetup.create(config, mesh=mesh, vocab_size=len(tok))
    params, _ = restore_params(setup, best_dir)
    results.append(evaluate(setup, params, tok, "test"))
  n_gt = [x["n_gt"] for x in two["records"]]
  assert 0 in n_gt and max(n_gt) >= 2                     # no-target and past-the-cap records are there
  assert len({x["answer"] for x in two["records"]}) > 1  # answers differ: rows are matched to their records
  for one in results:
    assert one["records"] == two["records"]
    assert one["subsets"] == two["subsets"] and one["overall"] == two["overall"]
    assert one["no_target_accuracy"] == two["no_target_accuracy"]
    assert one["no_target_records"] == two["no_target_records"] == n_gt.count(0)
  assert two["step"] is not None


def test_sigterm_saves_exits_0_and_resumes_to_the_same_losses(trained, toy_dataset, tmp_path):
  """A run SIGTERMed after step 1 is logged checkpoints and exits 0; restarted, every step's losses are
  those of the uninterrupted run (which also evaluated: evaluation does not perturb training)."""
  from segearth_jax import train as train_lib
  from segearth_jax.config import load_config

  ov = _overrides(toy_dataset, "--config.train.ckpt_every=100")
  p = subprocess.Popen(_train_cmd(tmp_path, ov), env=_env(8), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True)
  log = tmp_path / "metrics.jsonl"
  deadline = time.time() + 600
  while p.poll() is None and time.time() < deadline and not (log.exists() and log.read_text().strip()):
    time.sleep(0.02)
  p.send_signal(signal.SIGTERM)
  out, err = p.communicate(timeout=600)
  assert p.returncode == 0, err[-3000:]
  stopped = json.loads(out.strip().splitlines()[-1])["steps"]
  assert stopped < STEPS, "the run ended before the signal"
  assert sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit()) == [stopped]
  assert sorted(_losses(tmp_path)) == list(range(1, stopped + 1))
  config = load_config(os.path.join(REPO, "experiments", "toy.py"), ov)
  assert train_lib.train(config, str(tmp_path))["steps"] == STEPS
  rows = _losses(tmp_path)
  ref = {r["step"]: r for r in _records(trained["workdir"], "train")}
  assert sorted(rows) == list(range(1, STEPS + 1))
  for step in rows:
    for k in LOSS_KEYS:
      np.testing.assert_allclose(rows[step][k], ref[step][k], rtol=1e-6, atol=1e-6, err_msg=f"step {step} {k}")


def test_grad_accum_2_is_the_batch_of_8(toy_dataset):
  """float32: train.grad_accum=2 (2 micro-batches of 4) gives the loss, grad norm and grads of one batch of
  8, though the micro-batches hold different numbers of answer tokens and masks. The mask terms (points
  sampled at random positions) and dropout are off: their draws depend on the batch's shape."""
  from segearth_jax import sharding as shd
  from segearth_jax import train as train_lib

  extra = ["--config.model.lora.dropout=0.0", "--config.loss.bce_weight=0.0", "--config.loss.dice_weight=0.0",
           "--config.train.grad_clip=0.0", "--config.train.lr=1e-3"]
  batch = random_batch(tiny_config(*extra), 8, seed=3)
  out = []
  for accum in (1, 2):
    config = tiny_config(*extra, f"--config.train.grad_accum={accum}")
    setup = train_lib.TrainSetup.create(config, mesh=shd.single_device_mesh())   # one device: a quick compile
    state, frozen = setup.init_state(0)
    step = setup.jit_train_step(batch)
    with shd.in_mesh(setup.mesh):
      new, metrics = step(state, frozen, train_lib.global_batch(batch, setup.batch_sharding))
    out.append((jax.device_get(metrics), first_moments(jax.device_get(new["opt_state"]))))
  (m1, mu1), (m2, mu2) = out
  for k in ("loss", "text", "ls", "grad_norm"):
    np.testing.assert_allclose(m2[k], m1[k], rtol=1e-5, atol=1e-5, err_msg=k)
  # Adam's first moment after one step is (1 - b1) * grad: the grads themselves, leaf by leaf (the params
  # after an Adam step would amplify float noise in near-zero grads to a whole step)
  assert len(mu1) == len(mu2) > 0
  scale = max(float(np.abs(a).max()) for a in mu1)   # leaves whose grads are 0 hold float noise only
  for a, b in zip(mu1, mu2):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * scale)


def first_moments(opt_state) -> list:
  return [x for path, x in jax.tree_util.tree_leaves_with_path(opt_state)
          if any(getattr(k, "name", None) == "mu" for k in path)]
