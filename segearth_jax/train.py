"""Training: one jitted train step over a (data, fsdp, tensor) mesh, orbax checkpoints, resume.

The step takes (state, frozen, batch): ``state`` holds the trainable params, their optimizer state, the
step and the rng, and is donated; ``frozen`` (no grads, no optimizer state) is read only. Shardings
come from the logical-axis rule table in sharding.py. The host never waits inside a step: the metrics of
step t are fetched after step t+1 is dispatched.
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
from segearth_jax.checkpointing import Checkpointer, abstract_like
from segearth_jax.config import load_config
from segearth_jax.data.batch import device_part, global_batch
from segearth_jax.data.pipeline import make_dataset
from segearth_jax.data.tokenizer import load_tokenizer
from segearth_jax.errors import UserError
from segearth_jax.flops import peak_flops, train_flops_per_sample
from segearth_jax.losses import segearth_loss, text_loss
from segearth_jax.model_setup import ModelSetup, with_shardings
from segearth_jax.models.segearth import SegEarthR2
from segearth_jax.optim import make_optimizer, merge_params, split_params
from segearth_jax.presets import image_tokens
from segearth_jax.weights import restore_params, save_run_config

OBJECTIVES = ("segearth", "text")   # the full loss of method.md §4 | next-token loss only


def maybe_initialize_distributed(config) -> None:
  d = config.distributed
  # before anything touches the XLA backend (jax.devices() included); once per process
  if d.enabled and not jax.distributed.is_initialized():
    jax.distributed.initialize(coordinator_address=d.coordinator_address or None,
                               num_processes=d.num_processes or None, process_id=d.process_id,
                               local_device_ids=list(d.local_device_ids) or None)


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
    with self.mesh:
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
    grad_fn = jax.value_and_grad(self.loss_fn, has_aux=True)
    if accum == 1:
      (loss, terms), grads = grad_fn(state["params"], frozen, batch, key)
    else:
      micro = jax.tree.map(lambda x: x.reshape((accum, x.shape[0] // accum) + x.shape[1:]), batch)

      def body(carry, xs):
        mb, i = xs
        (l, t), g = grad_fn(state["params"], frozen, mb, jax.random.fold_in(key, i))
        return jax.tree.map(jnp.add, carry, (l, t, g)), None

      zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(lambda: grad_fn(state["params"], frozen,
                                                                         jax.tree.map(lambda x: x[0], micro), key)))
      zeros = (zeros[0][0], zeros[0][1], zeros[1])
      (loss, terms, grads), _ = jax.lax.scan(body, zeros, (micro, jnp.arange(accum)))
      loss, terms, grads = jax.tree.map(lambda x: x / accum, (loss, terms, grads))
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

  def batch_shardings(self, batch: dict):
    return {k: self.batch_sharding(np.ndim(v)) for k, v in batch.items()}

  def jit_train_step(self, batch_example: dict):
    rep = shd.replicated(self.mesh)
    return jax.jit(self.train_step,
                   in_shardings=(self.state_shardings, self.frozen_shardings, self.batch_shardings(batch_example)),
                   out_shardings=(self.state_shardings, rep), donate_argnums=(0,))


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
  maybe_initialize_distributed(config)
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
      with setup.mesh, shd.axis_rules():
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
    if pending is not None:
      _finish(pending, throughput, config, log_path, writer, history, bar, t_last)
    bar.close()
  finally:
    ckpt.wait()
    stop.restore()
  ckpt.close()
  if writer is not None:
    writer.close()
  if is_main:
    plot_losses(log_path, os.path.join(workdir, "loss.png"))
  return dict(steps=int(jax.device_get(state["step"])), history=history, stopped=stop.requested)


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
  record = dict(step=step, **m)
  if throughput.peak_basis:
    record["mfu_basis"] = throughput.peak_basis
  history.append(record)
  if jax.process_index() == 0:
    _log_line(log_path, record)
    if writer is not None and (step % config.train.log_every == 0 or step == 1):
      for k, v in m.items():
        writer.add_scalar(f"train/{k}", v, step)
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
