"""`segearth report RUN...`: the eval JSONs of several runs side by side, in the paper's layout.

A RUN is a workdir (its ``eval/<split>.json``, written by `segearth eval`) or the path of an eval JSON.
Writes ``<out>/report.md`` and ``<out>/report.png``:
  report.md   one row per run (named by its folder), LaSeRS subsets as columns in the order
              part, single, multiple, implicit (method.md §8), then the other subsets the runs have
              (semantic, instance, explicit, short, long, then any other name, sorted), then Average
              (the eval JSON's mean over its scored subsets). Each cell is "gIoU/cIoU" in percent with one
              decimal (57.2/67.9); "-" where a run lacks that subset. Under the table: the protocol each row
              used (prompt presets, decoding, dtype, seed, GT mode, teacher-forced), its step and its overall
              score, since numbers from different protocols are not comparable.
  report.png  grouped bars: gIoU (percent) per column per run.
"""
from __future__ import annotations

import json
import os

from segearth_jax.errors import UserError
from segearth_jax.experiment import DECODING_PRESETS

SUBSET_ORDER = ("part", "single", "multiple", "implicit", "semantic", "instance", "explicit", "short", "long")
AVERAGE = "Average"
NOT_SCORED = ("no_target",)   # no-target records have no masks to score (their accuracy is a separate number)


def eval_json_path(run: str, split: str) -> str:
  """The eval JSON a RUN names: the path itself when it is a file or ends in .json, else the workdir's."""
  if os.path.isfile(run) or run.endswith(".json"):
    return run
  return os.path.join(run, "eval", f"{split}.json")


def run_name(run: str) -> str:
  """The run's folder: ``runs/a`` and ``runs/a/eval/test.json`` are both 'a'."""
  path = os.path.normpath(os.path.abspath(run))
  if path.endswith(".json"):
    folder = os.path.dirname(path)
    path = os.path.dirname(folder) if os.path.basename(folder) == "eval" else path[: -len(".json")]
  return os.path.basename(path)


def load_run(run: str, split: str) -> dict:
  path = eval_json_path(run, split)
  if not os.path.isfile(path):
    raise UserError(f"run {run}: no eval JSON at {path} (write it with `segearth eval`)")
  try:
    with open(path) as f:
      result = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise UserError(f"run {run}: {path} is not a readable eval JSON ({e})")
  if not isinstance(result, dict) or "subsets" not in result or "overall" not in result:
    raise UserError(f"run {run}: {path} has no 'subsets'/'overall' (not a `segearth eval` result)")
  return result


def columns_of(results: list[dict]) -> list[str]:
  """Subset columns the runs have, in the paper's order then the rest sorted, then Average."""
  have = {name for r in results for name in r["subsets"] if name not in NOT_SCORED}
  known = [s for s in SUBSET_ORDER if s in have]
  return known + sorted(have - set(SUBSET_ORDER)) + [AVERAGE]


def scores(result: dict, column: str) -> tuple[float, float] | None:
  """(gIoU, cIoU) as fractions, None where the run lacks the column."""
  if column == AVERAGE:
    g, c = result.get("mean_over_subsets"), result.get("mean_over_subsets_cIoU")
    return None if g is None or c is None else (float(g), float(c))
  s = result["subsets"].get(column)
  return None if s is None else (float(s["gIoU"]), float(s["cIoU"]))


def cell(pair: tuple[float, float] | None) -> str:
  return "-" if pair is None else f"{100 * pair[0]:.1f}/{100 * pair[1]:.1f}"


def _template_text(value) -> str:
  # preset names show as they are; a literal template (a whole conversation) as its quoted start
  text = str(value)
  if "<image>" not in text and "\n" not in text and len(text) <= 40:
    return text
  return "literal " + json.dumps(text[:32] + ("..." if len(text) > 32 else ""))


def decoding_summary(decoding: dict | None, teacher_forced: bool) -> str:
  if teacher_forced or decoding is None:
    return "none (teacher-forced on the reference answer)"
  preset = next((name for name, fields in DECODING_PRESETS.items()
                 if all(decoding.get(k) == v for k, v in fields.items())), None)
  t = float(decoding.get("temperature", 0.0))
  how = "greedy" if t == 0 else (f"sampled T={t:g}, top-k {decoding.get('top_k', 0)}, "
                                 f"top-p {decoding.get('top_p', 1.0)}")
  cap = decoding.get("max_seg", -1)
  cap_text = {-1: "model.max_seg", 0: "none"}.get(cap, str(cap))
  text = f"{how}, {decoding.get('max_new_tokens', '?')} new tokens max, [SEG] cap {cap_text}"
  return f"{preset} preset: {text}" if preset and preset != how else text


def protocol_line(result: dict) -> str:
  p = result.get("protocol")
  if not p:
    return "protocol not recorded (an eval JSON from before protocols were recorded)"
  prompt = ", ".join(f"{k}={_template_text(v)}" for k, v in sorted(p.get("prompt", {}).items())) or "-"
  tf = bool(p.get("teacher_forced"))
  return (f"prompt {prompt}; decoding {decoding_summary(p.get('decoding'), tf)}; dtype {p.get('dtype')}; "
          f"seed {p.get('seed')}; GT {p.get('gt_resize')}; teacher-forced {'yes' if tf else 'no'}")


def _unique_names(runs: list[str]) -> list[str]:
  names = [run_name(r) for r in runs]
  # two runs in folders of the same name: the paths as given tell them apart
  return [r if names.count(n) > 1 else n for r, n in zip(runs, names)]


def format_report(names: list[str], results: list[dict]) -> str:
  cols = columns_of(results)
  rows = ["| run | " + " | ".join(c if c == AVERAGE else c.capitalize() for c in cols) + " |",
          "|---|" + "---|" * len(cols)]
  for name, r in zip(names, results):
    rows.append(f"| {name} | " + " | ".join(cell(scores(r, c)) for c in cols) + " |")
  rows += ["", "gIoU/cIoU in percent. Average: the mean over every scored subset of the run's eval JSON.",
           "", "Protocol per row:", ""]
  for name, r in zip(names, results):
    o = r["overall"]
    step = r.get("step")
    rows.append(f"- **{name}** (split {r.get('split', '?')}, step {'?' if step is None else step}, overall "
                f"{cell((o['gIoU'], o['cIoU']))} over {o.get('units', '?')} masks): {protocol_line(r)}")
  return "\n".join(rows)


def write_chart(names: list[str], results: list[dict], path: str) -> None:
  """Grouped bars: one group per column of the table, one bar (gIoU %) per run; a lacking subset has no bar."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  cols = columns_of(results)
  width = 0.8 / len(results)
  fig, ax = plt.subplots(figsize=(max(6.0, 1.0 + 0.9 * len(cols) * max(1.0, len(results) / 2)), 4.0))
  for i, (name, r) in enumerate(zip(names, results)):
    xs, ys = [], []
    for j, c in enumerate(cols):
      pair = scores(r, c)
      if pair is not None:
        xs.append(j - 0.4 + width * (i + 0.5))
        ys.append(100 * pair[0])
    ax.bar(xs, ys, width, label=name)
  ax.set_xticks(range(len(cols)))
  ax.set_xticklabels([c if c == AVERAGE else c.capitalize() for c in cols])
  ax.set_ylabel("gIoU (%)")
  ax.set_ylim(0, 100)
  ax.legend(fontsize="small")
  ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write_report(runs: list[str], split: str, out: str) -> tuple[str, str, str]:
  """(markdown, report.md path, report.png path). Every run is read before anything is written."""
  results = [load_run(r, split) for r in runs]
  names = _unique_names(runs)
  text = format_report(names, results)
  os.makedirs(out, exist_ok=True)
  md_path, png_path = os.path.join(out, "report.md"), os.path.join(out, "report.png")
  with open(md_path, "w") as f:
    f.write(text + "\n")
  write_chart(names, results, png_path)
  return text, md_path, png_path


def cli_main(args) -> int:
  text, md_path, png_path = write_report(args.runs, args.split, args.out)
  print(text)
  print(f"written: {md_path}, {png_path}")
  return 0
