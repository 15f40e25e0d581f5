"""The grain input pipeline: tfds.data_source -> shuffle -> per-process shard -> preprocess -> batch.

  make_dataset(config, split, *, tokenizer, train, process_index=None, process_count=None, seed=None)
      -> grain IterDataset of per-process numpy batches (the contract: data/batch.py); `it = iter(ds)`,
      `it.get_state()` / `it.set_state(s)` resume exactly.
  bench_cli(args) -> `segearth bench data --config CFG --batches N` (one JSON line).

Train: the epoch is shuffled with the seed (a new order each epoch), repeated forever, and process p takes
rows p*B .. p*B+B-1 of every global batch of n_proc*B rows (see _GlobalBatchShard); batches drop nothing
because the stream is infinite. Eval: no shuffle, one pass; every process yields the same number of batches
(ceil(n / n_proc) rounded up to B), the rows past the end are padding with sample_valid False (bad records
with data.skip_bad become padding too).
"""
from __future__ import annotations

import functools
import json
import math
import os
import time

import grain
import jax
from absl import flags

from segearth_jax.config import load_config
from segearth_jax.data import preprocess
from segearth_jax.data.tokenizer import load_tokenizer
from segearth_jax.errors import UserError


def open_source(name: str, split: str, data_dir: str):
  """tfds.data_source with errors a user can act on (missing build, unknown split)."""
  import tensorflow_datasets as tfds

  import tfds_laserss  # noqa: F401  (registers the builders)
  if not data_dir or not os.path.isdir(data_dir):
    raise UserError(f"data.data_dir {data_dir!r} does not exist; build it with "
                    f"`segearth data build {name} --manual-dir DIR --data-dir {data_dir or 'OUT'}`")
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:
    raise UserError(f"dataset {name!r} in {data_dir}: cannot be opened: {e}") from e
  if not builder.is_prepared():
    raise UserError(f"dataset {name!r} is not built in {data_dir}; run `segearth data build {name} ...`")
  splits = list(builder.info.splits.keys())
  if split not in splits:
    raise UserError(f"dataset {name!r} in {data_dir}: unknown split {split!r}; it has {splits}")
  return tfds.data_source(name, split=split, data_dir=data_dir)


class _EvalRow:
  """Position k of this process's padded eval stream -> processed example (padding past the end)."""

  def __init__(self, source, pre, index, count, n):
    self.source, self.pre, self.index, self.count, self.n = source, pre, index, count, n

  def __call__(self, k):
    i = self.index + k * self.count
    out = self.pre(self.source[i]) if i < self.n else None
    if out is None:  # past the end, or a bad record skipped with data.skip_bad
      for j in range(self.n):
        pad = self.pre(self.source[j])
        if pad is not None:
          return preprocess.as_padding(pad)
      raise UserError(f"{self.pre.source_name}: no usable record to pad with")
    return out


class _GlobalBatchShard(grain.MapDataset):
  """Process p of n takes rows p*B .. p*B+B-1 of every global batch of n*B shuffled rows, so a global
  batch holds the same examples in the same order for any process count: a 2-host run computes what a
  1-host run computes."""

  def __init__(self, parent, index, count, per_process):
    super().__init__(parent)
    self._i, self._n, self._b = index, count, per_process

  def __len__(self):
    return len(self._parent) // self._n

  def __getitem__(self, j):
    if isinstance(j, slice):
      return self.slice(j)
    return self._parent[(j // self._b) * (self._b * self._n) + self._i * self._b + j % self._b]

  def __str__(self):
    return f"GlobalBatchShard(process={self._i}/{self._n}, per_process={self._b})"


def make_dataset(config, split, *, tokenizer, train: bool, process_index=None, process_count=None,
                 seed=None):
  d = config.data
  pi = jax.process_index() if process_index is None else int(process_index)
  pc = jax.process_count() if process_count is None else int(process_count)
  if config.train.batch_size % pc:
    raise UserError(f"train.batch_size={config.train.batch_size} is not divisible by {pc} processes")
  B = config.train.batch_size // pc
  seed = int(d.shuffle_seed if seed is None else seed)
  source = open_source(d.name, split, d.data_dir)
  n = len(source)
  if n == 0:
    raise UserError(f"dataset {d.name!r} split {split!r} in {d.data_dir} is empty")
  pre = preprocess.Preprocessor(config, tokenizer, train=train, source_name=f"{d.data_dir}/{d.name}/{split}")
  if train:
    ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat()
    if pc > 1:
      ds = _GlobalBatchShard(ds, pi, pc, B)
    ds = ds.map(pre)
  else:
    per_process = math.ceil(math.ceil(n / pc) / B) * B
    ds = grain.MapDataset.range(per_process).map(_EvalRow(source, pre, pi, pc, n))
  # Threads overlap PIL/numpy work (both release the GIL); a small buffer bounds memory at 1024 canvases.
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=max(2, min(8, B)), prefetch_buffer_size=2 * B))
  it = it.batch(B, drop_remainder=train)
  it = it.map(functools.partial(preprocess.trim_to_bucket, buckets=tuple(d.text_buckets)))
  if int(d.workers) > 0:
    _absl_flags_defaults()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(d.workers)))
  return it


def _absl_flags_defaults():
  """grain's worker processes read absl flags; outside an absl app nobody parsed them: use defaults."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def bench_cli(args) -> int:
  """examples/s of the full pipeline (decode + preprocess + batch) and the figure per CPU core used."""
  config = load_config(args.config, args.overrides)
  tok = load_tokenizer(config.data.tokenizer)
  ds = make_dataset(config, "train", tokenizer=tok, train=True, process_index=0, process_count=1)
  it = iter(ds)
  next(it)  # warm-up: threads, first decode
  B = config.train.batch_size
  t0 = time.perf_counter()
  c0 = time.process_time()
  for _ in range(args.batches):
    next(it)
  wall = time.perf_counter() - t0
  cpu = time.process_time() - c0
  workers = int(config.data.workers)
  n = args.batches * B
  eps = n / wall
  # per core: in-process, examples per CPU-second of this process (all threads; robust to a loaded machine);
  # with workers the main process only forwards batches, so wall throughput / workers
  per_core = n / cpu if workers == 0 else eps / workers
  print(json.dumps(dict(
      bench="data", config=args.config, dataset=config.data.name, batches=args.batches, batch_size=B,
      siglip=config.model.vision.image_size, swin=config.model.swin.image_size,
      examples_per_s=round(eps, 2), cpu_s=round(cpu, 2), wall_s=round(wall, 2),
      examples_per_s_per_core=round(per_core, 2), cpu_count=os.cpu_count(), workers=workers)))
  return 0
