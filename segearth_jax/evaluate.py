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

Every process of a multi-host mesh runs ``evaluate``: each reads its own shard of the split, the jitted fn
(eval_fn_of: outputs sharded like the batch rows) runs on the global batch, each process scores the rows it
holds (local_rows: no transfer of another process's rows), the per-record scores are gathered
(allgather_json) and summed in record order, so the result is the same on every process and for any process
or device count; process 0 writes the JSON (evaluate_workdir).
"""
from __future__ import annotations

import json
import math
import os
from collections import defaultdict

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

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


def eval_fn_of(setup, tokenizer):
  """The jitted masks function the protocol scores: teacher-forced or generated (``config.eval``)."""
  fn = make_teacher_forced_fn(setup) if setup.config.eval.teacher_forced else predict_fn_of(setup, tokenizer)
  # outputs sharded like the batch rows: each process reads back the rows of its own records (local_rows)
  return jax.jit(fn, out_shardings=shd.batch_sharding(setup.mesh, 1))


def protocol_of(config) -> dict:
  """What a reported number used: prompt, decoding, dtype, seed, GT mode (method.md §5, §7)."""
  e = config.eval
  prompt = {k: config.data[k] for k in ("train_template", "eval_template", "strip_instruction")}
  return dict(prompt=prompt, decoding=None if e.teacher_forced else config.infer.to_dict(),
              dtype=e.dtype or config.model.dtype, seed=int(config.infer.seed), gt_resize=e.gt_resize,
              teacher_forced=bool(e.teacher_forced))


def evaluate(setup, params, tokenizer, split: str = "test", *, with_baselines: bool = False,
             max_examples: int | None = None, predict=None) -> dict:
  """Scores ``split`` (its first ``max_examples`` records when given) on every process of the mesh: each
  process generates its own shard of the records (data/pipeline.py's eval order: record p + j * n_proc on
  process p) as one global batch per step, scores the rows it holds, and the per-record scores of every
  process are gathered and summed in record order, so every process returns the same result and any
  process count gives the same sums. ``predict``: an `eval_fn_of` result to reuse (one compile for several
  param sets)."""
  config = setup.config
  gt_resize, teacher_forced = config.eval.gt_resize, bool(config.eval.teacher_forced)
  if gt_resize not in GT_RESIZE:
    raise UserError(f"eval.gt_resize must be one of {GT_RESIZE}, got {gt_resize!r}")
  M = setup.model.config.swin.image_size
  dataset = make_dataset(config, split, tokenizer=tokenizer, train=False)
  predict = predict or eval_fn_of(setup, tokenizer)
  pi, pc = jax.process_index(), jax.process_count()
  B = config.train.batch_size // pc
  n_batches = None if max_examples is None else math.ceil(max_examples / (B * pc))
  scored = []
  rng = jax.random.key(config.infer.seed)
  for i, host in enumerate(dataset):
    if n_batches is not None and i >= n_batches:
      break
    batch = global_batch(device_part(host), setup.batch_sharding)
    with shd.in_mesh(setup.mesh):
      out = jax.tree.map(local_rows, predict(params, batch, jax.random.fold_in(rng, i)))
    for b in range(len(host["sample_valid"])):
      index = pi + (i * B + b) * pc
      if host["sample_valid"][b] and (max_examples is None or index < max_examples):
        scored.append(_score_record(host, b, out, index, tokenizer, gt_resize, teacher_forced, M))
  scored = sorted((s for part in allgather_json(scored) for s in part), key=lambda s: s["index"])
  return _summarise(scored, split, config, with_baselines, teacher_forced)


def local_rows(x: jax.Array) -> np.ndarray:
  """The rows of a batch-sharded global array that this process holds, in order: the rows of the host
  batch it put in (jax.make_array_from_process_local_data fills a process's rows in index order)."""
  if x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  rows = {}
  for shard in x.addressable_shards:   # replicas of a row block on other mesh axes: one copy
    rows.setdefault(shard.index[0].start or 0, shard.data)
  return np.concatenate([np.asarray(rows[k]) for k in sorted(rows)])


def allgather_json(obj) -> list:
  """Every process's JSON-able ``obj``, in process order (one collective of the encoded bytes)."""
  if jax.process_count() == 1:
    return [obj]
  data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int32))).reshape(-1)
  buf = np.zeros(int(sizes.max()), np.uint8)
  buf[: data.size] = data
  everyone = np.asarray(multihost_utils.process_allgather(buf))
  return [json.loads(everyone[p, : int(sizes[p])].tobytes()) for p in range(len(sizes))]


def _sums(acc: IoUAccumulator) -> list:
  return [acc.iou_sum, acc.units, acc.inter, acc.union]


def _score_record(host, b, out, index, tokenizer, gt_resize, teacher_forced, canvas) -> dict:
  """One record's scores as sums (mergeable across processes) and its error-analysis entry."""
  # every target, the ones past the [SEG] cap included (they count as targets the model could not answer)
  targets = [rle.decode(r) for r in json.loads(str(host["targets"][b]))]
  n_gt = len(targets)
  n_pred = int(np.sum(out["seg_valid"][b]))
  preds, gts = scored_masks([out["masks"][b, j] for j in range(n_pred)], targets, host["letterbox"][b],
                            gt_resize, canvas)
  subsets = [s for s in str(host.get("subsets", [""] * (b + 1))[b]).split("|") if s]
  acc, empty = IoUAccumulator(), IoUAccumulator()
  ious = []
  if n_gt:
    ious = acc.add_record(preds, gts)
    empty.add_record([], gts)
  reference = str(host["answer"][b]) if "answer" in host else ""
  answer = reference if teacher_forced else tokenizer.decode(out["tokens"][b, : int(out["lengths"][b])])
  ref_phrases, got = PHRASE.findall(reference), PHRASE.findall(answer)
  ok = sum(1 for j, p in enumerate(ref_phrases) if j < len(got) and got[j].strip() == p.strip())
  # one entry per record, for error analysis (which subsets, wrong [SEG] count, which masks missed)
  record = dict(id=str(host["example_id"][b]), subsets=subsets, answer=answer, reference=reference,
                phrases_named=ok, n_pred=n_pred, n_gt=n_gt, ious=[round(float(v), 4) for v in ious])
  return dict(index=index, sums=_sums(acc), empty=_sums(empty), ref_phrases=len(ref_phrases), record=record)


def _summarise(scored: list, split: str, config, with_baselines: bool, teacher_forced: bool) -> dict:
  """The result dict from per-record scores in record order (the order fixes the float sums)."""
  overall, empty = IoUAccumulator(), IoUAccumulator()
  per_subset = defaultdict(IoUAccumulator)
  no_target = [0, 0]
  named = [0, 0]     # reference phrases the answer repeats at the same position, of all reference phrases
  for s in scored:
    r = s["record"]
    if r["n_gt"] == 0:
      no_target[0] += int(r["n_pred"] == 0)
      no_target[1] += 1
    else:
      overall.merge(IoUAccumulator(*s["sums"]))
      empty.merge(IoUAccumulator(*s["empty"]))
      for name in r["subsets"]:
        per_subset[name].merge(IoUAccumulator(*s["sums"]))
    named[0] += r["phrases_named"]
    named[1] += s["ref_phrases"]
  result = dict(split=split, overall=overall.summary(),
                subsets={k: v.summary() for k, v in sorted(per_subset.items())},
                no_target_accuracy=(no_target[0] / no_target[1]) if no_target[1] else None,
                no_target_records=no_target[1],
                # text-side diagnosis: a target whose phrase differs from the reference's at its position
                # is usually a wrong object (pairing is by order), whatever the mask head does
                phrase_accuracy=(named[0] / named[1]) if named[1] and not teacher_forced else None,
                phrases=named[1], protocol=protocol_of(config), records=[s["record"] for s in scored])
  subset_scores = [v for k, v in result["subsets"].items() if k != "no_target"]
  result["mean_over_subsets"] = float(np.mean([v["gIoU"] for v in subset_scores])) if subset_scores else None
  result["mean_over_subsets_cIoU"] = (float(np.mean([v["cIoU"] for v in subset_scores]))
                                      if subset_scores else None)
  if with_baselines:
    result["baselines"] = {"all_empty": empty.summary()}
  return result


def evaluate_workdir(config, workdir: str, split: str = "test", *, with_baselines: bool = True,
                     random_init_baseline: bool = True) -> dict:
  """Scores a training workdir or weights folder; process 0 writes <path>/eval/<split>.json. A run's best
  checkpoint (train.best_metric) is the workdir <workdir>/best."""
  if config.eval.dtype:       # e.g. the authors' float32 eval of a bf16-trained model
    config = ml_collections.ConfigDict(config.to_dict())
    config.model.dtype = config.eval.dtype
  tokenizer = load_tokenizer(config.data.tokenizer)
  setup = ModelSetup.create(config, vocab_size=len(tokenizer))
  params, step = restore_params(setup, workdir)
  predict = eval_fn_of(setup, tokenizer)   # one compile for the run's params and the random baseline
  result = evaluate(setup, params, tokenizer, split, with_baselines=with_baselines, predict=predict)
  result["step"] = None if step is None else int(step)
  if random_init_baseline:
    rand = evaluate(setup, setup.init_params(config.train.seed + 1000), tokenizer, split, predict=predict)
    result.setdefault("baselines", {})["random_init"] = rand["overall"]
  if jax.process_index() == 0:   # every process holds the same result
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
  shd.maybe_initialize_distributed(config)
  result = evaluate_workdir(config, args.workdir, args.split)
  if jax.process_index() == 0:
    print(format_table(result))
    print(f"written: {os.path.join(args.workdir, 'eval', args.split + '.json')}")
  return 0
