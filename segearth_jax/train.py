"""Training: one jitted train step over a (data, fsdp, tensor) mesh, orbax checkpoints, resume.

The step takes (state, frozen, batch): ``state`` holds the trainable params, their optimizer state, the
step and the rng, and is donated; ``frozen`` (no grads, no optimizer state) is read only. Shardings
come from the logical-axis rule table in sharding.py. The host never waits inside a step: the metrics of
step t are fetched after step t+1 is dispatched.

metrics.jsonl, one JSON object a line: ``kind`` 'train' (step, every loss term, grad_norm, lr, samples/s,
tokens/s, mfu) per step, and with ``train.eval_every`` ``kind`` 'eval' (step, split, examples, overall and
per-subset gIoU/cIoU/units, mean_over_subsets, no_target_accuracy, seconds) every eval_every steps.
Evaluation while training runs the jitted generation of evaluate.py (built once: one compile for every
evaluation) on the first train.eval_examples records of train.eval_split, on every process; the step with the
highest train.best_metric is kept as the workdir W/best (checkpointing.BestCheckpointer).
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from segearth_jax import sharding as shd
from segearth_jax.checkpointing import BestCheckpointer, Checkpointer, abstract_like
from segearth_jax.config import load_config
from segearth_jax.data.batch import IGNORE, device_part, global_batch
from segearth_jax.data.pipeline import make_dataset, mixture_counts
from segearth_jax.data.tokenizer import load_tokenizer
from segearth_jax.errors import UserError
from segearth_jax.evaluate import eval_fn_of, evaluate
from segearth_jax.flops import peak_flops, train_flops_per_sample
from segearth_jax.losses import segearth_loss, text_loss
from segearth_jax.model_setup import ModelSetup, with_shardings
from segearth_jax.models.segearth import SegEarthR2
from segearth_jax.optim import make_optimizer, merge_params, split_params
from segearth_jax.presets import image_tokens
from segearth_jax.weights import restore_params, save_run_config

OBJECTIVES = ("segearth", "text")   # the full loss of method.md §4 | next-token loss only
# what train.best_metric may name in the eval result (evaluate.evaluate); every one is higher-is-better
BEST_METRIC_ROOTS = ("overall", "subsets", "mean_over_subsets", "mean_over_subsets_cIoU", "no_target_accuracy",
                     "phrase_accuracy")


@dataclasses.dataclass
class TrainSetup(ModelSetup):
  """The model setup plus what the step needs: optimizer, schedule, state and frozen shardings."""
  tx: optax.GradientTransformation = None
  schedule: Any = None
  state_shardings: Any = None
  frozen_shardings: Any = None
  abstract: Any = None  # (state, frozen) as ShapeDtypeStructs with shardings: restore / AOT targets

  @classmethod
  def create(cls, config, mesh=None, vocab_size: int | None = None) -> "TrainSetup":
    if config.train.objective not in OBJECTIVES:
      raise UserError(f"train.objective must be one of {OBJECTIVES}, got {config.train.objective!r}")
    tx, schedule = make_optimizer(config.train)
    setup = super().create(config, mesh, vocab_size, tx=tx, schedule=schedule)
    trainable = config.train.trainable
    train_sh, frozen_sh = split_params(setup.param_shardings, trainable)
    abstract_train, abstract_frozen = split_params(setup.abstract_params, trainable)
    opt_abstract = jax.eval_shape(tx.init, abstract_train)
    rep = shd.replicated(setup.mesh)
    opt_sh = optax.tree_utils.tree_map_params(tx, lambda _, s: s, opt_abstract, train_sh,
                                              transform_non_params=lambda _: rep)
    setup.state_shardings = dict(params=train_sh, opt_state=opt_sh, step=rep, rng=rep)
    setup.frozen_shardings = frozen_sh
    setup.abstract = (with_shardings(dict(params=abstract_train, opt_state=opt_abstract,
                                          step=jax.ShapeDtypeStruct((), jnp.int32),
                                          rng=jax.ShapeDtypeStruct((2,), jnp.uint32)), setup.state_shardings),
                      abstract_frozen)
    return setup

  # ---------------------------------------------------------------------------------- init
  def init_state(self, seed: int):
    train, frozen = split_params(self.init_params(seed), self.config.train.trainable)
    return self.state_from_params(train, seed), frozen

  def state_from_params(self, train_params, seed: int):
    with shd.in_mesh(self.mesh):
      opt_state = jax.jit(self.tx.init, out_shardings=self.state_shardings["opt_state"])(train_params)
    rep = shd.replicated(self.mesh)
    return dict(params=train_params, opt_state=opt_state,
                step=jax.device_put(jnp.zeros((), jnp.int32), rep),
                rng=jax.device_put(jax.random.key_data(jax.random.key(seed + 1)), rep))

  # ---------------------------------------------------------------------------------- step
  def loss_fn(self, params, frozen, batch, key, train=True):
    full = merge_params(params, frozen)
    k_drop, k_pts = jax.random.split(key)
    if self.config.train.objective == "text":
      # next-token loss on the answers only: the mask head is not run (pre-training a from-scratch MLLM)
      out = self.model.apply({"params": full}, batch, train=train, with_seg_attn=False,
                             rngs={"dropout": k_drop}, method=SegEarthR2.language)
      text = text_loss(out["logits"], batch["labels"])
      return text, dict(text=text, total=text)
    out = self.model.apply({"params": full}, batch, train=train, rngs={"dropout": k_drop})
    return segearth_loss(out, batch, k_pts, self.config.loss, self.num_heads)

  def train_step(self, state, frozen, batch):
    accum = int(self.config.train.grad_accum)
    key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    if accum == 1:
      (loss, terms), grads = jax.value_and_grad(self.loss_fn, has_aux=True)(state["params"], frozen, batch, key)
    else:
      loss, terms, grads = self.accumulated_grads(state["params"], frozen, batch, key, accum)
    gnorm = optax.global_norm(grads)
    updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
    finite = jnp.isfinite(loss) & jnp.isfinite(gnorm) & jnp.isfinite(optax.global_norm(updates))
    params = optax.apply_updates(state["params"], updates)
    # a non-finite step changes nothing: the state stays the last good one and the host stops the run
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = dict(params=keep(params, state["params"]), opt_state=keep(opt_state, state["opt_state"]),
                     step=state["step"] + 1, rng=state["rng"])
    metrics = dict(terms, loss=loss, grad_norm=gnorm, lr=self.schedule(state["step"]), finite=finite)
    return new_state, metrics

  def accumulated_grads(self, params, frozen, batch, key, accum: int):
    """The loss, terms and grads of ``batch`` from ``accum`` micro-batches in a scan. Each term is a mean
    over its own units (answer tokens, masks, L_S rows: term_counts), so micro-batch i's term is weighted by
    its share of the batch's units, not by 1/accum: the sum is the full batch's term whatever the
    micro-batches hold. The random draws (dropout, mask-loss points) are per micro-batch."""
    micro = jax.tree.map(lambda x: x.reshape((accum, x.shape[0] // accum) + x.shape[1:]), batch)
    counts = term_counts(micro, self.config)
    shares = {t: c / jnp.maximum(c.sum(), 1.0) for t, c in counts.items()}

    def weighted(p, mb, k, share):
      _, terms = self.loss_fn(p, frozen, mb, k)
      terms = {t: v * share[t] if t in share else v for t, v in terms.items()}
      terms["total"] = combine_terms(terms, self.config)
      return terms["total"], terms

    grad_fn = jax.value_and_grad(weighted, has_aux=True)

    def body(carry, xs):
      mb, i, share = xs
      (l, t), g = grad_fn(params, mb, jax.random.fold_in(key, i), share)
      return jax.tree.map(jnp.add, carry, (l, t, g)), None

    first = jax.tree.map(lambda x: x[0], (micro, shares))
    shapes = jax.eval_shape(lambda: grad_fn(params, first[0], key, first[1]))
    zeros = jax.tree.map(jnp.zeros_like, (shapes[0][0], shapes[0][1], shapes[1]))
    (loss, terms, grads), _ = jax.lax.scan(body, zeros, (micro, jnp.arange(accum), shares))
    return loss, terms, grads

  def batch_shardings(self, batch: dict):
    return {k: self.batch_sharding(np.ndim(v)) for k, v in batch.items()}

  def jit_train_step(self, batch_example: dict):
    rep = shd.replicated(self.mesh)
    return jax.jit(self.train_step,
                   in_shardings=(self.state_shardings, self.frozen_shardings, self.batch_shardings(batch_example)),
                   out_shardings=(self.state_shardings, rep), donate_argnums=(0,))


def term_counts(micro: dict, config) -> dict:
  """``micro``: a batch reshaped to [accum, B / accum, ...] -> {loss term: [accum] the number of units each
  micro-batch's mean is over}: answer tokens (losses.text_loss), real masks (mask_losses.mask_loss), L_S rows
  (attention_supervision.ls_loss: real [SEG] rows whose grid has a foreground cell, or every real one)."""
  per_micro = lambda x: x.astype(jnp.float32).reshape(x.shape[0], -1).sum(-1)
  counts = dict(text=per_micro(micro["labels"][..., 1:] != IGNORE))
  if config.train.objective == "text":
    return counts
  real = micro["seg_valid"].astype(bool)
  counts.update(bce=per_micro(real), dice=per_micro(real))
  if config.loss.lambda_s:
    fg = (micro["mask_grid"] > 0.5).reshape(real.shape + (-1,)).any(-1)
    counts["ls"] = per_micro(real & fg if config.loss.ls_divisor == "kept" else real)
  return counts


def combine_terms(terms: dict, config) -> jax.Array:
  """The objective from its terms, as losses.segearth_loss weights them (text only for objective 'text')."""
  w = config.loss
  if config.train.objective == "text":
    return terms["text"]
  total = w.text_weight * terms["text"] + w.bce_weight * terms["bce"] + w.dice_weight * terms["dice"]
  if "ls" in terms:
    total = total + w.lambda_s * terms["ls"]
  return total


# ------------------------------------------------------------------------------------------ loop
class _StopFlag:
  def __init__(self):
    self.requested = False
    self._old = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, *_):
    self.requested = True

  def restore(self):
    signal.signal(signal.SIGTERM, self._old)


class NonFiniteError(UserError):
  pass


def _log_line(path: str, record: dict) -> None:
  with open(path, "a") as f:
    f.write(json.dumps(record) + "\n")


def train(config, workdir: str, *, resume: bool = True, max_steps: int | None = None) -> dict:
  """Runs training in ``workdir``; returns a summary. ``max_steps`` stops early (tests)."""
  shd.maybe_initialize_distributed(config)
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  if is_main:  # eval/predict/export read the run's config from here
    save_run_config(config, workdir)
  tokenizer = load_tokenizer(config.data.tokenizer)
  setup = TrainSetup.create(config, vocab_size=len(tokenizer))
  ckpt = Checkpointer(workdir, keep=config.train.keep_checkpoints, every=config.train.ckpt_every)
  dataset = make_dataset(config, "train", tokenizer=tokenizer, train=True)
  data_iter = iter(dataset)

  state, frozen = _initial_state(setup, config, ckpt)
  start = 0
  latest = ckpt.latest_step() if resume else None
  if latest is not None:
    state = ckpt.restore(latest, abstract_like(state), data_iter)
    start = latest
    if is_main:
      print(f"resumed from step {latest} in {workdir}", flush=True)

  log_path = os.path.join(workdir, "metrics.jsonl")
  writer = _tb_writer(workdir) if is_main else None
  throughput = Throughput(config, setup.mesh.devices.size)
  if writer is not None and throughput.peak_basis:
    writer.add_text("train/mfu_basis", throughput.peak_basis, start)
  total_steps = int(config.train.steps)
  end = min(total_steps, max_steps) if max_steps else total_steps
  evaluator = (Evaluator(config, setup, tokenizer, workdir, log_path, writer, ckpt)
               if int(config.train.eval_every) > 0 else None)
  stop = _StopFlag()
  step_fn = None
  pending = None  # (step, metrics, ids, t_dispatch)
  t_last = time.time()
  history = []
  try:
    bar = tqdm(total=end, initial=start, disable=True if not is_main else None,  # None: off when not a TTY
                dynamic_ncols=True, desc="train", mininterval=2.0)
    for step in range(start, end):
      host = next(data_iter)
      batch = device_part(host)
      if step_fn is None:
        step_fn = setup.jit_train_step(batch)
      gbatch = global_batch(batch, setup.batch_sharding)
      with shd.in_mesh(setup.mesh):
        state, metrics = step_fn(state, frozen, gbatch)
      if pending is not None:
        _finish(pending, throughput, config, log_path, writer, history, bar, t_last)
        t_last = time.time()
      pending = (step + 1, metrics, host.get("example_id"), throughput.of(host))
      last = step + 1 == end or stop.requested
      if last or ckpt.manager.should_save(step + 1):
        # a checkpoint is only written after its step is known to be finite
        _finish(pending, throughput, config, log_path, writer, history, bar, t_last)
        t_last, pending = time.time(), None
        ckpt.save(step + 1, state, data_iter, force=True)
      if stop.requested:
        break
      if evaluator is not None and (step + 1) % evaluator.every == 0:
        if pending is not None:   # the step's train record goes first
          _finish(pending, throughput, config, log_path, writer, history, bar, t_last)
          pending = None
        evaluator(step + 1, state, frozen)
        t_last = time.time()      # the next step's samples/s leaves the evaluation out
    if pending is not None:
      _finish(pending, throughput, config, log_path, writer, history, bar, t_last)
    bar.close()
  finally:
    ckpt.wait()
    stop.restore()
  ckpt.close()
  if evaluator is not None:
    evaluator.close()
  if writer is not None:
    writer.close()
  if is_main:
    plot_losses(log_path, os.path.join(workdir, "loss.png"))
  return dict(steps=int(jax.device_get(state["step"])), history=history, stopped=stop.requested)


class Evaluator:
  """train.eval_every: scores the first train.eval_examples records of train.eval_split with the current
  params, logs them (metrics.jsonl kind 'eval', TensorBoard '<split>/...') and keeps the best step."""

  def __init__(self, config, setup, tokenizer, workdir, log_path, writer, ckpt: Checkpointer):
    t = config.train
    self.setup, self.tokenizer, self.log_path, self.writer = setup, tokenizer, log_path, writer
    self.every, self.split = int(t.eval_every), str(t.eval_split)
    self.examples = int(t.eval_examples) or None
    self.predict = eval_fn_of(setup, tokenizer)   # one jitted fn: compiled once, reused every evaluation
    self.best = None
    if t.best_metric:
      if t.best_metric.split(".")[0] not in BEST_METRIC_ROOTS:   # at start, not at the first evaluation
        raise UserError(f"train.best_metric {t.best_metric!r} must start with one of {BEST_METRIC_ROOTS}")
      self.best = BestCheckpointer(workdir, t.best_metric)
      if jax.process_index() == 0:   # W/best is a workdir: eval, predict and export load it as one
        save_run_config(config, self.best.dir)
        link = os.path.join(self.best.dir, "frozen")
        if ckpt.has_frozen() and not os.path.lexists(link):
          os.symlink(os.path.relpath(ckpt.frozen_dir, self.best.dir), link)

  def __call__(self, step: int, state, frozen) -> dict:
    t0 = time.time()
    result = evaluate(self.setup, merge_params(state["params"], frozen), self.tokenizer, self.split,
                      max_examples=self.examples, predict=self.predict)
    record = dict(kind="eval", step=step, split=self.split, examples=len(result["records"]),
                  overall=result["overall"], subsets=result["subsets"],
                  mean_over_subsets=result["mean_over_subsets"],
                  no_target_accuracy=result["no_target_accuracy"], seconds=round(time.time() - t0, 3))
    if jax.process_index() == 0:
      _log_line(self.log_path, record)
      if self.writer is not None:
        for name, s in [("", result["overall"])] + [(f"{k}/", v) for k, v in result["subsets"].items()]:
          for metric in ("gIoU", "cIoU"):
            self.writer.add_scalar(f"{self.split}/{name}{metric}", s[metric], step)
        self.writer.flush()
    if self.best is not None:
      self.best.save(step, state["params"], metric_value(result, self.best.metric))
    return record

  def close(self):
    if self.best is not None:
      self.best.close()


def metric_value(result: dict, path: str) -> float:
  """``result`` at a dotted path ('overall.gIoU', 'subsets.single.cIoU', 'mean_over_subsets')."""
  value = result
  for key in path.split("."):
    if not isinstance(value, dict) or key not in value:
      raise UserError(f"train.best_metric {path!r}: the eval result has no {key!r} "
                      f"(it has {sorted(value) if isinstance(value, dict) else value!r})")
    value = value[key]
  return float("nan") if value is None else float(value)


class Throughput:
  """Per step: samples/s, real (unpadded) tokens/s and MFU = model FLOPs by formula (flops.py, at the
  batch's bucket length) / (the chips' dense bf16 peak x chips); the peak's basis is logged once."""

  def __init__(self, config, n_devices: int):
    self.config, self.n_devices = config, n_devices
    self.peak = peak_flops(jax.devices()[0])
    self.peak_basis = (f"{jax.devices()[0].device_kind}: {self.peak / 1e12:.0f} TFLOP/s dense bf16 x "
                       f"{n_devices} chips" if self.peak else None)   # None on CPU: no MFU

  def of(self, host: dict) -> dict:
    """What the step's throughput needs from its host batch: tokens and the bucket length."""
    return dict(tokens=int(np.sum(host["attention_mask"])) * jax.process_count(),
                length=int(np.shape(host["input_ids"])[1]))

  def metrics(self, batch: dict, dt: float) -> dict:
    c = self.config
    out = dict(samples_per_s=c.train.batch_size / dt, tokens_per_s=batch["tokens"] / dt)
    if self.peak:
      flops = train_flops_per_sample(c.model, batch["length"] - image_tokens(c.model), c.train.trainable,
                                     mask_head=c.train.objective != "text")
      out["mfu"] = flops * out["samples_per_s"] / (self.peak * self.n_devices)
    return out


def _finish(pending, throughput, config, log_path, writer, history, bar, t_last):
  step, metrics, ids, batch = pending
  m = {k: float(v) for k, v in jax.device_get(metrics).items()}
  if not m.pop("finite"):
    ids = [str(i) for i in (ids if ids is not None else [])]
    raise NonFiniteError(f"non-finite loss or gradient at step {step} (loss={m['loss']}, "
                         f"grad_norm={m['grad_norm']}); batch example ids: {ids}. "
                         "The last good checkpoint is kept.")
  dt = max(time.time() - t_last, 1e-9)
  m.update(throughput.metrics(batch, dt))
  record = dict(kind="train", step=step, **m)
  if throughput.peak_basis:
    record["mfu_basis"] = throughput.peak_basis
  if config.data.mixture:   # rows per source so far: a function of the position, the same on every process
    record["examples"] = mixture_counts(config, step * int(config.train.batch_size))
  history.append(record)
  if jax.process_index() == 0:
    _log_line(log_path, record)
    if writer is not None and (step % config.train.log_every == 0 or step == 1):
      for k, v in m.items():
        writer.add_scalar(f"train/{k}", v, step)
      for name, n in record.get("examples", {}).items():
        writer.add_scalar(f"data/examples/{name}", n, step)
    bar.update(1)
    bar.set_postfix(loss=f"{m['loss']:.3f}", refresh=False)


def _initial_state(setup: TrainSetup, config, ckpt: Checkpointer):
  if not config.train.init_from:
    state, frozen = setup.init_state(config.train.seed)
  else:                      # every param comes from there: no random init to throw away
    params, _ = restore_params(setup, config.train.init_from)
    train_p, frozen = split_params(params, config.train.trainable)
    state = setup.state_from_params(train_p, config.train.seed)
  if jax.tree.leaves(frozen):
    if ckpt.has_frozen():
      frozen = ckpt.restore_frozen(abstract_like(frozen))
    else:
      ckpt.save_frozen(frozen)
  return state, frozen


def _tb_writer(workdir):
  try:
    from tensorboardX import SummaryWriter
  except ImportError:  # logging is optional
    return None
  return SummaryWriter(os.path.join(workdir, "tb"))


def smooth(values, weight: float = 0.9) -> np.ndarray:
  """TensorBoard-style exponential moving average, debiased so the first points are not pulled to 0."""
  out, avg = [], 0.0
  for i, v in enumerate(values, 1):
    avg = weight * avg + (1 - weight) * v
    out.append(avg / (1 - weight ** i))
  return np.asarray(out)


def plot_losses(log_path: str, out_png: str) -> None:
  """loss.png: each loss term, the raw per-step curve faint and its smoothed curve over it."""
  if not os.path.exists(log_path):
    return
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = {}
  with open(log_path) as f:
    for line in f:
      r = json.loads(line)
      if r.get("kind", "train") == "train":
        rows[r["step"]] = r
  steps = sorted(rows)
  keys = [k for k in ("loss", "text", "bce", "dice", "ls") if k in rows[steps[0]]]
  fig, ax = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3))
  for a, k in zip(np.atleast_1d(ax), keys):
    raw = [rows[s][k] for s in steps]
    a.plot(steps, raw, lw=0.6, alpha=0.3, color="C0")
    a.plot(steps, smooth(raw), lw=1.5, color="C0")
    a.set_title(k)
    a.set_xlabel("step")
  fig.tight_layout()
  fig.savefig(out_png, dpi=100)
  plt.close(fig)


def cli_main(args) -> int:
  config = load_config(args.config, args.overrides)
  summary = train(config, args.workdir, resume=not args.no_resume)
  if jax.process_index() == 0:
    last = summary["history"][-1] if summary["history"] else {}
    print(json.dumps({"steps": summary["steps"], "loss": last.get("loss"), "workdir": args.workdir}))
  return 0
