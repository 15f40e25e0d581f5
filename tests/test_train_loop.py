"""The training loop as users run it: 2 processes == 1 process, SIGKILL + restart == uninterrupted,
a non-finite step stops the run naming the step and the batch's examples."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from train_fixtures import REPO, TINY_OVERRIDES

STEPS = 9
CKPT_EVERY = 3


def _overrides(ds, *extra):
  return TINY_OVERRIDES + [
      f"--config.data.data_dir={ds['data_dir']}",
      f"--config.data.tokenizer={ds['tokenizer']}", f"--config.train.steps={STEPS}",
      f"--config.train.ckpt_every={CKPT_EVERY}", "--config.loss.lambda_s=0.1", *extra]


def _env(devices):
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  env["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"
  env.pop("JAX_NUM_CPU_DEVICES", None)
  return env


def _train_cmd(workdir, overrides):
  return [sys.executable, "-m", "segearth_jax", "train", "--config", os.path.join(REPO, "experiments", "toy.py"),
          "--workdir", str(workdir), *overrides]


def _losses(workdir) -> dict:
  rows = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      r = json.loads(line)
      rows[r["step"]] = r   # a step redone after a restart: the last record wins
  return rows


@pytest.fixture(scope="module")
def reference_run(toy_dataset, tmp_path_factory):
  """Single process, 8 devices, uninterrupted."""
  wd = tmp_path_factory.mktemp("ref")
  r = subprocess.run(_train_cmd(wd, _overrides(toy_dataset)), env=_env(8), capture_output=True, text=True,
                     timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  rows = _losses(wd)
  assert sorted(rows) == list(range(1, STEPS + 1))
  assert all(rows[s]["samples_per_s"] > 0 and rows[s]["tokens_per_s"] > rows[s]["samples_per_s"] for s in rows)
  rows["workdir"] = str(wd)
  return rows


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one(toy_dataset, reference_run, tmp_path):
  port = _free_port()
  procs = []
  for pid in range(2):
    ov = _overrides(toy_dataset, "--config.distributed.enabled=True",
                    f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                    "--config.distributed.num_processes=2", f"--config.distributed.process_id={pid}")
    procs.append(subprocess.Popen(_train_cmd(tmp_path, ov), env=_env(4), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  rows = _losses(tmp_path)
  assert sorted(rows) == list(range(1, STEPS + 1))
  for step in range(1, 4):  # the issue asks for 3 steps; the run goes on to checkpointing
    for k in ("loss", "text", "bce", "dice", "ls"):
      np.testing.assert_allclose(rows[step][k], reference_run[step][k], rtol=1e-5, atol=1e-5,
                                 err_msg=f"step {step} {k}")


def test_sigkill_and_restart_gives_the_same_losses(toy_dataset, reference_run, tmp_path):
  cmd = _train_cmd(tmp_path, _overrides(toy_dataset))
  p = subprocess.Popen(cmd, env=_env(8), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  target = tmp_path / "checkpoints" / str(CKPT_EVERY)
  deadline = time.time() + 600
  while not target.exists() and p.poll() is None and time.time() < deadline:
    time.sleep(0.01)
  p.send_signal(signal.SIGKILL)
  p.wait()
  killed = _losses(tmp_path)
  assert max(killed) < STEPS, "the run ended before it could be killed"
  r = subprocess.run(cmd, env=_env(8), capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "resumed from step" in r.stdout + r.stderr
  rows = _losses(tmp_path)
  assert sorted(rows) == list(range(1, STEPS + 1))
  for step in rows:
    for k in ("loss", "text", "bce", "dice", "ls"):
      np.testing.assert_allclose(rows[step][k], reference_run[step][k], rtol=1e-6, atol=1e-6,
                                 err_msg=f"step {step} {k}")


def test_non_finite_step_stops_with_step_and_ids(toy_dataset, tmp_path, monkeypatch):
  from segearth_jax import train as train_lib
  from segearth_jax.config import load_config

  config = load_config(os.path.join(REPO, "experiments", "toy.py"), _overrides(toy_dataset))
  calls = {"n": 0}
  real = train_lib.device_part

  def poisoned(batch):
    out = real(batch)
    calls["n"] += 1
    if calls["n"] == 5:      # the batch of step 5
      calls["ids"] = [str(i) for i in batch["example_id"]]
      out["siglip_image"] = np.full_like(out["siglip_image"], np.nan)
    return out

  monkeypatch.setattr(train_lib, "device_part", poisoned)
  with pytest.raises(train_lib.NonFiniteError) as e:
    train_lib.train(config, str(tmp_path))
  msg = str(e.value)
  assert "step 5" in msg
  assert all(i in msg for i in calls["ids"])
  from segearth_jax.checkpointing import Checkpointer
  ck = Checkpointer(str(tmp_path), async_save=False)
  assert ck.latest_step() == CKPT_EVERY      # the last good checkpoint, nothing after the bad step
  ck.close()


def test_predict_cli_writes_masks_and_overlay(toy_dataset, reference_run, tmp_path):
  """`segearth predict` on a toy test image, as a user would after training (any size/format in, original size out)."""
  from PIL import Image

  from segearth_jax.predict import CAPTION_MIN_WIDTH
  src = os.path.join(toy_dataset["manual_dir"], "test", "images")
  name = sorted(os.listdir(src))[0]
  img = Image.open(os.path.join(src, name)).convert("RGB").resize((300, 200))
  jpg = tmp_path / "scene.jpg"
  img.save(jpg)                                        # non-square JPEG: letterboxed in, un-letterboxed out
  out = tmp_path / "pred"
  r = subprocess.run([sys.executable, "-m", "segearth_jax", "predict", "--workdir", reference_run["workdir"],
                      "--image", str(jpg), "--instruction", "the storage tanks", "--out", str(out)],
                     env=_env(1), capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  pred = json.loads((out / "prediction.json").read_text())
  assert pred["instruction"] == "the storage tanks" and isinstance(pred["answer"], str)
  overlay = Image.open(out / "overlay.png")
  assert overlay.width == max(300, CAPTION_MIN_WIDTH) and overlay.height >= 200   # a wider caption area
  for i, rle in enumerate(pred["masks"]):
    assert rle["size"] == [200, 300]
    assert Image.open(out / f"mask_{i}.png").size == (300, 200)
  bad = subprocess.run([sys.executable, "-m", "segearth_jax", "predict", "--workdir", reference_run["workdir"],
                        "--image", str(tmp_path / "missing.png"), "--instruction", "x"],
                       env=_env(1), capture_output=True, text=True, timeout=120)
  assert bad.returncode == 2 and "missing.png" in bad.stderr and "Traceback" not in bad.stderr


def test_eval_cli_scores_every_test_record(toy_dataset, reference_run, tmp_path):
  """`segearth eval` on the trained toy workdir: one entry per test record, and the reported overall
  gIoU / no-target figures are exactly what those per-record entries add up to."""
  wd = reference_run["workdir"]
  r = subprocess.run([sys.executable, "-m", "segearth_jax", "eval", "--config",
                      os.path.join(REPO, "experiments", "toy.py"), "--workdir", wd, "--split", "test",
                      *_overrides(toy_dataset)], env=_env(1), capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "| **overall** |" in r.stdout and "baseline: random_init" in r.stdout
  result = json.loads(open(os.path.join(wd, "eval", "test.json")).read())
  ann_dir = os.path.join(toy_dataset["manual_dir"], "test", "annotations")
  truth, answers = {}, {}
  for name in os.listdir(ann_dir):
    for a in json.load(open(os.path.join(ann_dir, name))):
      truth[a["id"]], answers[a["id"]] = len(a["mask"]), a["answer"]
  records = result["records"]
  assert sorted(x["id"] for x in records) == sorted(truth)
  for x in records:
    assert x["n_gt"] == truth[x["id"]] and len(x["ious"]) == x["n_gt"], x
    assert isinstance(x["answer"], str) and 0 <= x["n_pred"]
    assert x["reference"] == answers[x["id"]]
    phrase = r"<p>(.*?)</p>\s*\[SEG\]"     # a phrase names a target when a [SEG] follows it
    ref, got = re.findall(phrase, x["reference"]), re.findall(phrase, x["answer"])
    assert x["phrases_named"] == sum(j < len(got) and got[j] == p for j, p in enumerate(ref)), x
  n_phrases = sum(len(re.findall(r"<p>.*?</p>\s*\[SEG\]", a)) for a in answers.values())
  assert result["phrases"] == n_phrases > 0
  assert result["phrase_accuracy"] == sum(x["phrases_named"] for x in records) / n_phrases
  assert "| phrases as in the reference |" in r.stdout
  ious = [v for x in records for v in x["ious"]]
  assert result["overall"]["units"] == len(ious)
  assert abs(result["overall"]["gIoU"] - float(np.mean(ious))) < 1e-3   # records are rounded to 4 places
  no_target = [x for x in records if x["n_gt"] == 0]
  assert result["no_target_records"] == len(no_target) == sum(n == 0 for n in truth.values())
  if no_target:
    assert result["no_target_accuracy"] == sum(x["n_pred"] == 0 for x in no_target) / len(no_target)
  assert result["baselines"]["all_empty"]["gIoU"] == 0.0
  assert result["step"] == STEPS


def test_text_stage_trains_the_mllm_and_seeds_the_full_stage(toy_dataset, tmp_path):
  """experiments/toy_text.py (next-token loss only, mask head not run or trained) -> its workdir is the
  `train.init_from` of the SegEarth-R2 stage, which starts from exactly those weights."""
  import jax
  from flax import traverse_util

  from segearth_jax import train as train_lib
  from segearth_jax.checkpointing import Checkpointer
  from segearth_jax.config import load_config
  from segearth_jax.data.tokenizer import load_tokenizer
  from segearth_jax.optim import merge_params
  from segearth_jax.weights import load_params

  text_wd, full_wd = tmp_path / "text", tmp_path / "full"
  text_cfg = load_config(os.path.join(REPO, "experiments", "toy_text.py"),
                         _overrides(toy_dataset, "--config.train.steps=3", "--config.train.ckpt_every=3"))
  assert text_cfg.train.objective == "text"
  out = train_lib.train(text_cfg, str(text_wd))
  assert out["steps"] == 3
  rows = _losses(text_wd)
  assert all(np.isfinite(rows[s]["text"]) and "bce" not in rows[s] and "ls" not in rows[s] for s in (1, 2, 3))

  vocab = len(load_tokenizer(toy_dataset["tokenizer"]))
  setup = train_lib.TrainSetup.create(text_cfg, vocab_size=vocab)
  state0, frozen0 = setup.init_state(text_cfg.train.seed)
  init = traverse_util.flatten_dict(jax.device_get(merge_params(state0["params"], frozen0)), sep="/")
  trained = traverse_util.flatten_dict(load_params(str(text_wd)), sep="/")
  assert set(init) == set(trained)
  changed = {k for k in init if not np.array_equal(np.asarray(init[k]), np.asarray(trained[k]))}
  assert any(k.startswith("llm/") for k in changed) and any(k.startswith("vision/") for k in changed)
  assert not any(k.startswith(("mask_head/", "seg_projector/")) for k in changed)

  full_cfg = load_config(os.path.join(REPO, "experiments", "toy.py"),
                         _overrides(toy_dataset, f"--config.train.init_from={text_wd}"))
  setup = train_lib.TrainSetup.create(full_cfg, vocab_size=vocab)
  ck = Checkpointer(str(full_wd), async_save=False)
  state, frozen = train_lib._initial_state(setup, full_cfg, ck)
  ck.close()
  start = traverse_util.flatten_dict(jax.device_get(merge_params(state["params"], frozen)), sep="/")
  assert set(start) == set(trained)
  assert all(np.array_equal(np.asarray(start[k]), np.asarray(trained[k])) for k in trained)


def test_unknown_objective_is_a_user_error(toy_dataset):
  from segearth_jax import train as train_lib
  from segearth_jax.config import load_config
  from segearth_jax.errors import UserError

  cfg = load_config(os.path.join(REPO, "experiments", "toy.py"),
                    _overrides(toy_dataset, "--config.train.objective=masks"))
  with pytest.raises(UserError, match="train.objective"):
    train_lib.TrainSetup.create(cfg)


def test_predict_overrides_apply_to_the_stored_config(toy_dataset, reference_run, tmp_path):
  """`segearth predict --workdir W --config.infer.max_new_tokens=1` (no --config): the override applies to
  the run's stored config; a field that does not exist is refused, naming it."""
  from PIL import Image

  from segearth_jax import cli
  from segearth_jax.predict import Predictor

  pred = Predictor.load(reference_run["workdir"], overrides=["--config.infer.max_new_tokens=1"])
  assert pred.config.infer.max_new_tokens == 1
  src = os.path.join(toy_dataset["manual_dir"], "test", "images")
  image = np.asarray(Image.open(os.path.join(src, sorted(os.listdir(src))[0])).convert("RGB"))
  assert len(pred(image, "the storage tanks")["tokens"]) == 1
  img = os.path.join(src, sorted(os.listdir(src))[0])
  rc = cli.main(["predict", "--workdir", reference_run["workdir"], "--image", img, "--instruction", "x",
                 "--out", str(tmp_path / "o"), "--config.infer.nosuch=1"])
  assert rc == 2 and not (tmp_path / "o").exists()


def test_eval_with_the_authors_protocol_records_it(toy_dataset, reference_run, tmp_path):
  """`segearth eval --config experiments/authors_eval.py:toy` on the toy run: their prompt, sampling,
  float32 and GT resize; the JSON says so."""
  wd = reference_run["workdir"]
  data = [f"--config.data.data_dir={toy_dataset['data_dir']}", f"--config.data.tokenizer={toy_dataset['tokenizer']}",
          *TINY_OVERRIDES[:7], "--config.data.text_buckets=(640,)", "--config.data.max_len=640",
          "--config.infer.max_new_tokens=12", "--config.train.batch_size=8"]
  for variant in ("toy", "toy,teacher_forced"):
    r = subprocess.run([sys.executable, "-m", "segearth_jax", "eval", "--config",
                        os.path.join(REPO, "experiments", f"authors_eval.py:{variant}"), "--workdir", wd,
                        "--split", "test", *data], env=_env(1), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(open(os.path.join(wd, "eval", "test.json")).read())
    p = result["protocol"]
    assert p["dtype"] == "float32" and p["gt_resize"] == "authors" and p["seed"] == 0
    assert p["prompt"]["eval_template"] == "authors_eval" and p["prompt"]["strip_instruction"] is True
    assert "Protocol: GT authors, float32" in r.stdout
    if variant == "toy":
      assert p["teacher_forced"] is False
      assert p["decoding"]["temperature"] == 0.2 and p["decoding"]["top_k"] == 50 and p["decoding"]["max_seg"] == 0
    else:   # the reference answer's [SEG]s, up to the model's cap, each give a mask
      assert p["teacher_forced"] is True and p["decoding"] is None
      assert all(x["n_pred"] == min(x["n_gt"], 2) for x in result["records"])
      assert sum(x["n_pred"] for x in result["records"]) > 0
    assert result["overall"]["units"] == sum(x["n_gt"] for x in result["records"]) > 0
