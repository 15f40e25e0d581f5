"""Evaluation: generate answers, decode one mask per generated [SEG], score gIoU/cIoU per subset.

Scoring follows method.md §7 on the M x M canvas (model.swin.image_size, 1024 in the paper). The protocol is
config.eval (recorded in every result under "protocol", with the prompt and decoding it used):
  gt_resize 'letterbox'  GT letterboxed like the image (nearest) and both cropped to the image region
            'authors'    GT stretched to M x M (bilinear, align_corners=False, no antialias, > 0) and scored
                         against the prediction on the whole canvas, as the authors' eval.py does (the same
                         as 'letterbox' up to interpolation for square images, misaligned otherwise)
  teacher_forced         the masks of the reference answer's [SEG] (no generation; their contest protocol)
  dtype                  compute dtype ('' = model.dtype; their eval runs float32)
Records with no target report no-target accuracy (no [SEG] generated).
"""
from __future__ import annotations

import json
import os
from collections import defaultdict

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from segearth_jax import sharding as shd
from segearth_jax.config import load_config
from segearth_jax.data import rle
from segearth_jax.data.answer import PHRASE
from segearth_jax.data.batch import device_part, global_batch
from segearth_jax.data.pipeline import make_dataset
from segearth_jax.data.preprocess import letterbox_mask, resize_bilinear
from segearth_jax.errors import UserError
from segearth_jax.data.tokenizer import load_tokenizer
from segearth_jax.metrics import IoUAccumulator
from segearth_jax.model_setup import ModelSetup
from segearth_jax.predict import predict_fn_of
from segearth_jax.weights import restore_params


GT_RESIZE = ("letterbox", "authors")


def _crop(mask, letterbox):
  return mask[: int(letterbox[2]), : int(letterbox[3])]


def scored_masks(preds: list, targets: list, letterbox, gt_resize: str, canvas: int) -> tuple[list, list]:
  """(predictions, GT masks) as compared: ``preds`` canvas masks, ``targets`` original-size GT masks."""
  if gt_resize == "letterbox":
    rh, rw = int(letterbox[2]), int(letterbox[3])
    return ([_crop(p, letterbox) for p in preds],
            [letterbox_mask(t.astype(np.uint8), canvas, rh, rw)[:rh, :rw] for t in targets])
  return list(preds), [resize_bilinear(t.astype(np.float32), (canvas, canvas)) > 0 for t in targets]


def make_teacher_forced_fn(setup):
  """Jitted: (params, batch, rng) -> seg_valid, masks [B,K,M,M]: the final masks of the reference answer's
  [SEG] states (the prompt and the answer fed as in training)."""
  model, M = setup.model, setup.model.config.swin.image_size

  def forward(params, batch, rng):
    logits = model.apply({"params": params}, batch, train=False, with_seg_attn=False)["mask_logits"][-1]
    b, k = logits.shape[:2]
    up = jax.image.resize(logits.astype(jnp.float32), (b, k, M, M), "bilinear")
    return dict(seg_valid=batch["seg_valid"], masks=(up > 0) & batch["seg_valid"][..., None, None])

  return jax.jit(forward)


def protocol_of(config) -> dict:
  """What a reported number used: prompt, decoding, dtype, seed, GT mode (method.md §5, §7)."""
  e = config.eval
  prompt = {k: config.data[k] for k in ("train_template", "eval_template", "strip_instruction")}
  return dict(prompt=prompt, decoding=None if e.teacher_forced else config.infer.to_dict(),
              dtype=e.dtype or config.model.dtype, seed=int(config.infer.seed), gt_resize=e.gt_resize,
              teacher_forced=bool(e.teacher_forced))


def evaluate(setup, params, tokenizer, split: str = "test", *, with_baselines: bool = False,
             max_batches: int | None = None, predict=None) -> dict:
  """``predict``: a `make_predict_fn` result to reuse (one compile for several param sets)."""
  config = setup.config
  gt_resize, teacher_forced = config.eval.gt_resize, bool(config.eval.teacher_forced)
  if gt_resize not in GT_RESIZE:
    raise UserError(f"eval.gt_resize must be one of {GT_RESIZE}, got {gt_resize!r}")
  M = setup.model.config.swin.image_size
  dataset = make_dataset(config, split, tokenizer=tokenizer, train=False)
  predict = predict or (make_teacher_forced_fn(setup) if teacher_forced else predict_fn_of(setup, tokenizer))
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
      # every target, the ones past the [SEG] cap included (they count as targets the model could not answer)
      targets = [rle.decode(r) for r in json.loads(str(host["targets"][b]))]
      n_gt = len(targets)
      n_pred = int(np.sum(out["seg_valid"][b]))
      preds, gts = scored_masks([out["masks"][b, j] for j in range(n_pred)], targets, host["letterbox"][b],
                                gt_resize, M)
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
      reference = str(host["answer"][b]) if "answer" in host else ""
      answer = reference if teacher_forced else tokenizer.decode(out["tokens"][b, : int(out["lengths"][b])])
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
                phrase_accuracy=(named[0] / named[1]) if named[1] and not teacher_forced else None,
                phrases=named[1], protocol=protocol_of(config), records=records)
  scored = [v for k, v in result["subsets"].items() if k != "no_target"]
  result["mean_over_subsets"] = float(np.mean([v["gIoU"] for v in scored])) if scored else None
  result["mean_over_subsets_cIoU"] = float(np.mean([v["cIoU"] for v in scored])) if scored else None
  if with_baselines:
    result["baselines"] = {"all_empty": empty.summary()}
  return result


def evaluate_workdir(config, workdir: str, split: str = "test", *, with_baselines: bool = True,
                     random_init_baseline: bool = True) -> dict:
  """Scores a training workdir or weights folder; writes <path>/eval/<split>.json."""
  if config.eval.dtype:       # e.g. the authors' float32 eval of a bf16-trained model
    config = ml_collections.ConfigDict(config.to_dict())
    config.model.dtype = config.eval.dtype
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
    rows.append(f"| mean over subsets | {result['mean_over_subsets']:.3f} | "
                f"{result.get('mean_over_subsets_cIoU') or 0:.3f} | |")
  if result.get("no_target_accuracy") is not None:
    rows.append(f"| no-target accuracy | {result['no_target_accuracy']:.3f} | | {result['no_target_records']} records |")
  if result.get("phrase_accuracy") is not None:
    rows.append(f"| phrases as in the reference | {result['phrase_accuracy']:.3f} | | {result['phrases']} phrases |")
  for name, b in result.get("baselines", {}).items():
    rows.append(f"| baseline: {name} | {b['gIoU']:.3f} | {b['cIoU']:.3f} | {b['units']} |")
  p = result.get("protocol")
  if p:
    how = "teacher-forced on the reference answer" if p["teacher_forced"] else json.dumps(p["decoding"])
    rows += ["", f"Protocol: GT {p['gt_resize']}, {p['dtype']}, seed {p['seed']}, {how}"]
  return "\n".join(rows)


def cli_main(args) -> int:
  config = load_config(args.config, args.overrides)
  result = evaluate_workdir(config, args.workdir, args.split)
  print(format_table(result))
  print(f"written: {os.path.join(args.workdir, 'eval', args.split + '.json')}")
  return 0
