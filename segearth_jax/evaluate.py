"""Evaluation: generate answers, decode one mask per generated [SEG], score gIoU/cIoU per subset.

Scoring follows method.md §7 on the letterboxed canvas (model.swin.image_size, 1024 in the paper),
cropped to the image region. Records with no target report no-target accuracy (no [SEG] generated).
"""
from __future__ import annotations

import json
import os
from collections import defaultdict

import jax
import numpy as np

from segearth_jax import sharding as shd
from segearth_jax.config import load_config
from segearth_jax.data import rle
from segearth_jax.data.answer import PHRASE
from segearth_jax.data.batch import device_part, global_batch
from segearth_jax.data.pipeline import make_dataset
from segearth_jax.data.tokenizer import load_tokenizer
from segearth_jax.metrics import IoUAccumulator
from segearth_jax.model_setup import ModelSetup
from segearth_jax.predict import predict_fn_of
from segearth_jax.weights import restore_params


def _crop(mask, letterbox):
  return mask[: int(letterbox[2]), : int(letterbox[3])]


def evaluate(setup, params, tokenizer, split: str = "test", *, with_baselines: bool = False,
             max_batches: int | None = None, predict=None) -> dict:
  """``predict``: a `make_predict_fn` result to reuse (one compile for several param sets)."""
  config = setup.config
  dataset = make_dataset(config, split, tokenizer=tokenizer, train=False)
  predict = predict or predict_fn_of(setup, tokenizer)
  overall, empty = IoUAccumulator(), IoUAccumulator()
  per_subset = defaultdict(IoUAccumulator)
  no_target = [0, 0]
  named = [0, 0]     # reference phrases the answer repeats at the same position, of all reference phrases
  records = []
  rng = jax.random.key(config.infer.seed)
  for i, host in enumerate(dataset):
    if max_batches is not None and i >= max_batches:
      break
    batch = global_batch(device_part(host), setup.batch_sharding)
    with setup.mesh, shd.axis_rules():
      out = jax.device_get(predict(params, batch, jax.random.fold_in(rng, i)))
    for b in range(len(host["sample_valid"])):
      if not host["sample_valid"][b]:
        continue
      lb = host["letterbox"][b]
      gts = [_crop(host["masks"][b, j], lb) for j in range(int(np.sum(host["seg_valid"][b])))]
      gts += [rle.decode(r) for r in json.loads(str(host["beyond_cap"][b]))]   # past the [SEG] cap
      n_gt = len(gts)
      n_pred = int(np.sum(out["seg_valid"][b]))
      preds = [_crop(out["masks"][b, j], lb) for j in range(n_pred)]
      subsets = [s for s in str(host.get("subsets", [""] * (b + 1))[b]).split("|") if s]
      ious = []
      if n_gt == 0:
        no_target[0] += int(n_pred == 0)
        no_target[1] += 1
      else:
        ious = overall.add_record(preds, gts)
        empty.add_record([], gts)
        for s in subsets:
          per_subset[s].add_record(preds, gts)
      # one entry per record, for error analysis (which subsets, wrong [SEG] count, which masks missed)
      answer = tokenizer.decode(out["tokens"][b, : int(out["lengths"][b])])
      reference = str(host["answer"][b]) if "answer" in host else ""
      ref_phrases, got = PHRASE.findall(reference), PHRASE.findall(answer)
      ok = sum(1 for j, p in enumerate(ref_phrases) if j < len(got) and got[j].strip() == p.strip())
      named[0] += ok
      named[1] += len(ref_phrases)
      records.append(dict(id=str(host["example_id"][b]), subsets=subsets, answer=answer, reference=reference,
                          phrases_named=ok, n_pred=n_pred, n_gt=n_gt, ious=[round(float(v), 4) for v in ious]))
  result = dict(split=split, overall=overall.summary(),
                subsets={k: v.summary() for k, v in sorted(per_subset.items())},
                no_target_accuracy=(no_target[0] / no_target[1]) if no_target[1] else None,
                no_target_records=no_target[1],
                # text-side diagnosis: a target whose phrase differs from the reference's at its position
                # is usually a wrong object (pairing is by order), whatever the mask head does
                phrase_accuracy=(named[0] / named[1]) if named[1] else None, phrases=named[1],
                records=records)
  subset_gious = [v["gIoU"] for k, v in result["subsets"].items() if k != "no_target"]
  result["mean_over_subsets"] = float(np.mean(subset_gious)) if subset_gious else None
  if with_baselines:
    result["baselines"] = {"all_empty": empty.summary()}
  return result


def evaluate_workdir(config, workdir: str, split: str = "test", *, with_baselines: bool = True,
                     random_init_baseline: bool = True) -> dict:
  tokenizer = load_tokenizer(config.data.tokenizer)
  setup = ModelSetup.create(config, vocab_size=len(tokenizer))
  params, step = restore_params(setup, workdir)
  predict = predict_fn_of(setup, tokenizer)
  result = evaluate(setup, params, tokenizer, split, with_baselines=with_baselines, predict=predict)
  result["step"] = None if step is None else int(step)
  if random_init_baseline:
    rand = evaluate(setup, setup.init_params(config.train.seed + 1000), tokenizer, split, predict=predict)
    result.setdefault("baselines", {})["random_init"] = rand["overall"]
  os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
  with open(os.path.join(workdir, "eval", f"{split}.json"), "w") as f:
    json.dump(result, f, indent=2)
  return result


def format_table(result: dict) -> str:
  rows = ["| subset | gIoU | cIoU | masks |", "|---|---|---|---|"]
  for name, s in result["subsets"].items():
    rows.append(f"| {name} | {s['gIoU']:.3f} | {s['cIoU']:.3f} | {s['units']} |")
  o = result["overall"]
  rows.append(f"| **overall** | **{o['gIoU']:.3f}** | **{o['cIoU']:.3f}** | {o['units']} |")
  if result.get("mean_over_subsets") is not None:
    rows.append(f"| mean over subsets | {result['mean_over_subsets']:.3f} | | |")
  if result.get("no_target_accuracy") is not None:
    rows.append(f"| no-target accuracy | {result['no_target_accuracy']:.3f} | | {result['no_target_records']} records |")
  if result.get("phrase_accuracy") is not None:
    rows.append(f"| phrases as in the reference | {result['phrase_accuracy']:.3f} | | {result['phrases']} phrases |")
  for name, b in result.get("baselines", {}).items():
    rows.append(f"| baseline: {name} | {b['gIoU']:.3f} | {b['cIoU']:.3f} | {b['units']} |")
  return "\n".join(rows)


def cli_main(args) -> int:
  config = load_config(args.config, args.overrides)
  result = evaluate_workdir(config, args.workdir, args.split)
  print(format_table(result))
  print(f"written: {os.path.join(args.workdir, 'eval', args.split + '.json')}")
  return 0
