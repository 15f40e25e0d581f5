"""`make demo`: toy LaSeRS -> TFDS build -> train experiments/toy_text.py, then experiments/toy.py from its
weights -> eval -> predictions -> report.

Each stage is the same code path a user runs by hand (`segearth data toy`, `segearth data build`,
`segearth train`, `segearth eval`, `segearth predict`); the demo only chains them and writes
``runs/demo/report.md``.
"""
from __future__ import annotations

import json
import os
import time

from segearth_jax.config import load_config
from segearth_jax.data.preview import draw_grid
from segearth_jax.evaluate import evaluate_workdir, format_table
from segearth_jax.predict import predict_examples
from segearth_jax.toy.release import write_toy_laserss
from segearth_jax.train import train
from tfds_laserss.build import build


def _stage(name):
  print(f"\n== {name} ==", flush=True)
  return time.time()


def cli_main(args) -> int:
  out = os.path.abspath(args.out)
  os.makedirs(out, exist_ok=True)
  report = ["# segearth_jax demo", ""]
  timings = {}

  t = _stage("toy data")
  toy_dir = os.path.join(out, "toy_laserss")
  # 60 test scenes (240 records) keep eval ~1 min; many train scenes are cheap (~40 ms each to draw and
  # build) and were worth +0.06 gIoU over 210 at the same steps (README experiment log).
  train_scenes = int(os.environ.get("SEGEARTH_DEMO_TRAIN_IMAGES", 1000))
  summary = write_toy_laserss(toy_dir, images=train_scenes + 90, seed=0, test_images=60, val_images=30)
  timings["toy data"] = time.time() - t
  report += ["## Toy data", "", f"`{toy_dir}`: {json.dumps(summary, default=str)}", ""]

  t = _stage("picture grid")
  grid = os.path.join(out, "examples.png")
  draw_grid(toy_dir, "train", 12, grid)
  timings["grid"] = time.time() - t
  report += ["![examples](examples.png)", ""]

  overrides = [f"--config.data.data_dir={os.path.join(out, 'tfds')}",
               f"--config.data.tokenizer={os.path.join(toy_dir, 'tokenizer')}"]
  overrides += args.overrides   # the command line's --config.a.b=v apply to both stages
  text_config = load_config(args.text_config, overrides) if args.text_config else None
  text_workdir = os.path.join(out, "workdir_text")
  if text_config is not None:
    overrides.append(f"--config.train.init_from={text_workdir}")
  config = load_config(args.config, overrides)

  t = _stage("TFDS build")
  build("laserss", manual_dir=toy_dir, data_dir=config.data.data_dir)
  timings["tfds build"] = time.time() - t

  if text_config is not None:
    t = _stage("train, stage 1: the MLLM on the answers' text")
    train(text_config, text_workdir)
    timings["train (text stage)"] = time.time() - t
    report += ["## Training, stage 1 (text)", "", "![loss](workdir_text/loss.png)", ""]

  workdir = os.path.join(out, "workdir")
  t = _stage("train")
  train(config, workdir)
  timings["train"] = time.time() - t
  report += ["## Training", "", "![loss](workdir/loss.png)", ""]

  t = _stage("eval")
  results = evaluate_workdir(config, workdir, "test", with_baselines=True)
  timings["eval"] = time.time() - t
  with open(os.path.join(out, "eval.json"), "w") as f:
    json.dump(results, f, indent=2)
  table = format_table(results)
  print(table)
  report += ["## Evaluation (toy test split)", "", table, ""]

  t = _stage("predict")
  pics = predict_examples(config, workdir, toy_dir, os.path.join(out, "predictions"), n=8)
  timings["predict"] = time.time() - t
  report += ["## Predictions", ""] + [f"![{os.path.basename(p)}]({os.path.relpath(p, out)})" for p in pics]

  report += ["", "## Timings (s)", ""] + [f"- {k}: {v:.1f}" for k, v in timings.items()]
  with open(os.path.join(out, "report.md"), "w") as f:
    f.write("\n".join(report) + "\n")
  print(f"\nreport: {os.path.join(out, 'report.md')}")
  print(f"try the model in a browser: segearth serve --workdir {workdir}")
  return 0
