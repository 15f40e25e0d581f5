"""`segearth report`: two runs' eval JSONs -> the paper-layout table (cells = their numbers), protocols, a PNG."""
from __future__ import annotations

import json
import os

from PIL import Image

from segearth_jax import cli


def _subset(g, c, units=10):
  return {"gIoU": g, "cIoU": c, "units": units}


def _write_eval(workdir, result, split="test"):
  os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
  with open(os.path.join(workdir, "eval", f"{split}.json"), "w") as f:
    json.dump(result, f)


RUN_A = dict(
    split="test", step=1200, records=[],
    overall=_subset(0.5123, 0.6049, 31),
    subsets={"implicit": _subset(0.428, 0.597), "multiple": _subset(0.383, 0.562),
             "part": _subset(0.648, 0.683), "semantic": _subset(0.25, 0.125), "single": _subset(0.551, 0.692)},
    mean_over_subsets=0.572, mean_over_subsets_cIoU=0.679, no_target_accuracy=1.0,
    protocol=dict(prompt={"eval_template": "authors_eval", "train_template": "authors_train"},
                  decoding=dict(max_new_tokens=128, temperature=0.2, top_k=50, top_p=1.0, seed=3, max_seg=0),
                  dtype="float32", seed=3, gt_resize="authors", teacher_forced=False))

RUN_B = dict(   # no 'semantic' subset: its cell is '-'
    split="test", step=40, records=[],
    overall=_subset(0.1, 0.2, 31),
    subsets={"part": _subset(0.1004, 0.2), "single": _subset(0.0, 1.0), "multiple": _subset(0.3333, 0.6666),
             "implicit": _subset(0.05, 0.95)},
    mean_over_subsets=0.1209, mean_over_subsets_cIoU=0.7042, no_target_accuracy=None,
    protocol=dict(prompt={"eval_template": "toy", "train_template": "toy"},
                  decoding=dict(max_new_tokens=64, temperature=0.0, top_k=0, top_p=1.0, seed=0, max_seg=-1),
                  dtype="bfloat16", seed=0, gt_resize="letterbox", teacher_forced=False))


def _table(md):
  """{run: {column: cell}} from the markdown table at the top of report.md."""
  lines = [line for line in md.splitlines() if line.startswith("|")]
  header = [h.strip() for h in lines[0].strip("|").split("|")]
  out = {}
  for line in lines[2:]:
    cells = [c.strip() for c in line.strip("|").split("|")]
    out[cells[0]] = dict(zip(header[1:], cells[1:]))
  return header, out


def test_report_of_two_runs(tmp_path, capsys):
  wd1, wd2, out = tmp_path / "lasers_mipha", tmp_path / "toy_run", tmp_path / "rep"
  _write_eval(str(wd1), RUN_A)
  _write_eval(str(wd2), RUN_B)
  rc = cli.main(["report", str(wd1), str(wd2), "--out", str(out)])
  assert rc == 0
  md = (out / "report.md").read_text()
  header, rows = _table(md)
  # the paper's order first, the other subsets after, Average last
  assert header == ["run", "Part", "Single", "Multiple", "Implicit", "Semantic", "Average"]
  assert rows["lasers_mipha"] == {"Part": "64.8/68.3", "Single": "55.1/69.2", "Multiple": "38.3/56.2",
                                  "Implicit": "42.8/59.7", "Semantic": "25.0/12.5", "Average": "57.2/67.9"}
  assert rows["toy_run"] == {"Part": "10.0/20.0", "Single": "0.0/100.0", "Multiple": "33.3/66.7",
                             "Implicit": "5.0/95.0", "Semantic": "-", "Average": "12.1/70.4"}
  # each row's protocol and step
  lines = {n: next(line for line in md.splitlines() if line.startswith(f"- **{n}**"))
           for n in ("lasers_mipha", "toy_run")}
  a, b = lines["lasers_mipha"], lines["toy_run"]
  assert "step 1200" in a and "step 40" in b
  assert "eval_template=authors_eval" in a and "train_template=authors_train" in a and "eval_template=toy" in b
  assert "authors preset" in a and "sampled T=0.2, top-k 50" in a and "[SEG] cap none" in a
  assert "decoding greedy, 64 new tokens max" in b and "[SEG] cap model.max_seg" in b
  assert "dtype float32" in a and "dtype bfloat16" in b
  assert "seed 3" in a and "seed 0" in b
  assert "GT authors" in a and "GT letterbox" in b
  assert "teacher-forced no" in a and "overall 51.2/60.5 over 31 masks" in a
  # the table went to stdout too
  assert "| lasers_mipha | 64.8/68.3 |" in capsys.readouterr().out
  png = out / "report.png"
  assert png.stat().st_size > 0
  with Image.open(png) as im:
    assert im.format == "PNG" and im.size[0] > 0 and im.size[1] > 0


def test_report_takes_an_eval_json_path_and_names_its_run(tmp_path):
  wd, out = tmp_path / "runA", tmp_path / "rep"
  tf = dict(RUN_B, protocol=dict(RUN_B["protocol"], teacher_forced=True, decoding=None))
  _write_eval(str(wd), tf, split="val")
  rc = cli.main(["report", str(wd / "eval" / "val.json"), "--out", str(out)])
  assert rc == 0
  md = (out / "report.md").read_text()
  assert "| runA | 10.0/20.0 |" in md
  assert "teacher-forced yes" in md and "decoding none (teacher-forced" in md


def test_report_missing_eval_json_is_a_one_line_error(tmp_path, capsys):
  wd1, wd2, out = tmp_path / "ok", tmp_path / "never_evaluated", tmp_path / "rep"
  _write_eval(str(wd1), RUN_A)
  os.makedirs(wd2)
  rc = cli.main(["report", str(wd1), str(wd2), "--out", str(out)])
  assert rc == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1
  assert os.path.join(str(wd2), "eval", "test.json") in err
  assert not (out / "report.md").exists()   # nothing written when a run is missing
