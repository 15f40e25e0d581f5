"""The grain input pipeline: tfds.data_source -> shuffle -> (mix) -> per-process shard -> preprocess -> batch.

  make_dataset(config, split, *, tokenizer, train, process_index=None, process_count=None, seed=None)
      -> grain IterDataset of per-process numpy batches (the contract: data/batch.py); `it = iter(ds)`,
      `it.get_state()` / `it.set_state(s)` resume exactly. Train with data.mixture reads the mixture's
      splits (`split` is then not used).
  mixture_sources(config) -> [(builder, split, weight)] (data.mixture checked, weights summing to 1; [] = none)
  mixture_counts(config, examples, seed=None) -> {"builder/split": rows of it among the global stream's first
      `examples` rows}: exact and the same on every process (the mix is a function of the position)
  WeightedSelection(quotas, seed)  the mix itself (a grain DatasetSelectionMap)
  bench_cli(args) -> `segearth bench data --config CFG --batches N` (one JSON line).

Train: the epoch is shuffled with the seed (a new order each epoch), repeated forever, and process p takes
rows p*B .. p*B+B-1 of every global batch of n_proc*B rows (see _GlobalBatchShard); batches drop nothing
because the stream is infinite. With data.mixture, each source is shuffled and repeated so (its own seed,
drawn from the shuffle seed and its position in the list), and the global stream interleaves them: every
block of MIX_BLOCK consecutive rows holds round(weight x MIX_BLOCK) rows of each source (largest remainder),
in an order drawn from (seed, block). The mix, the shard and the iterator state (one position) are all
functions of the position, so resuming is exact and a 2-host run reads what a 1-host run reads; train
batches then carry `source` str[B] ('builder/split' of each row, host only).
Eval: no shuffle, one pass over data.name's split; every process yields the same number of batches
(ceil(n / n_proc) rounded up to B), the rows past the end are padding with sample_valid False (bad records
with data.skip_bad become padding too).
"""
from __future__ import annotations

import functools
import json
import math
import os
import sys
import time

import grain
import jax
import numpy as np
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


MIX_BLOCK = 1000   # the mixture's weights are realised to 1/MIX_BLOCK of the stream, exactly per block


def mixture_sources(config) -> list[tuple[str, str, float]]:
  """data.mixture as [(builder, split, weight)], weights normalised to sum 1; [] when there is none."""
  entries = [tuple(e) for e in config.data.mixture]
  out = []
  for e in entries:
    if len(e) != 3 or not all(isinstance(x, str) for x in e[:2]) or isinstance(e[2], bool) \
        or not isinstance(e[2], (int, float)) or not math.isfinite(e[2]) or e[2] <= 0:
      raise UserError(f"data.mixture entry {e!r}: expected (builder, split, weight > 0), e.g. "
                      f"('laserss', 'train', 0.8)")
    out.append((e[0], e[1], float(e[2])))
  names = [f"{b}/{s}" for b, s, _ in out]
  if len(set(names)) != len(names):
    raise UserError(f"data.mixture names a source twice: {names}")
  total = sum(w for _, _, w in out)
  out = [(b, s, w / total) for b, s, w in out]
  small = [n for n, q in zip(names, mix_quotas([w for _, _, w in out])) if q == 0]
  if small:
    raise UserError(f"data.mixture: {small} get no row in {MIX_BLOCK} (weights are realised to "
                    f"1/{MIX_BLOCK}); drop them or raise their weight")
  return out


def mix_quotas(weights, block: int = MIX_BLOCK) -> tuple[int, ...]:
  """Rows per block of each source: floor(w x block), the rest to the largest remainders (ties: first)."""
  exact = [w * block for w in weights]
  q = [int(math.floor(x)) for x in exact]
  order = sorted(range(len(q)), key=lambda i: (-(exact[i] - q[i]), i))
  for i in order[:block - sum(q)]:
    q[i] += 1
  return tuple(q)


@functools.lru_cache(maxsize=16)
def _mix_block(quotas: tuple[int, ...], seed: int, block: int) -> tuple[np.ndarray, np.ndarray]:
  """(source of each row of the block, its rank among the block's rows of that source)."""
  src = np.repeat(np.arange(len(quotas), dtype=np.int32), quotas)
  np.random.default_rng([seed, 0, block]).shuffle(src)
  rank = np.empty_like(src)
  for s, q in enumerate(quotas):
    rank[src == s] = np.arange(q, dtype=np.int32)
  return src, rank


class WeightedSelection(grain.transforms.DatasetSelectionMap):
  """Mixed-stream position k -> (source s, row of s's own stream); stateless (grain needs that): block
  b = k // N holds quotas[s] rows of each source in a seeded order, so s's rows before block b number
  b x quotas[s]."""

  def __init__(self, quotas: tuple[int, ...], seed: int):
    self.quotas, self.seed, self.block = tuple(int(q) for q in quotas), int(seed), int(sum(quotas))

  def __len__(self):
    return sys.maxsize

  def __getitem__(self, k):
    b, j = divmod(int(k), self.block)
    src, rank = _mix_block(self.quotas, self.seed, b)
    s = int(src[j])
    return s, b * self.quotas[s] + int(rank[j])

  def counts(self, n: int) -> list[int]:
    """Rows of each source among positions 0 .. n-1."""
    b, j = divmod(int(n), self.block)
    src, _ = _mix_block(self.quotas, self.seed, b)
    part = np.bincount(src[:j], minlength=len(self.quotas))
    return [b * q + int(c) for q, c in zip(self.quotas, part)]


def _mix_seed(seed: int, k: int) -> int:
  """Source k's shuffle seed: distinct per source, a function of the shuffle seed."""
  return int(np.random.SeedSequence([seed, 1, k]).generate_state(1)[0])


def mixture_counts(config, examples: int, seed=None) -> dict[str, int]:
  """{"builder/split": rows} among the first `examples` rows of the global train stream (all processes);
  at step t that is t x train.batch_size (bad records skipped with data.skip_bad still count)."""
  sources = mixture_sources(config)
  seed = int(config.data.shuffle_seed if seed is None else seed)
  sel = WeightedSelection(mix_quotas([w for _, _, w in sources]), seed)
  return {f"{b}/{s}": c for (b, s, _), c in zip(sources, sel.counts(examples))}


class _Tagged:
  """A preprocessor whose examples also name their source (a bad record skipped stays None)."""

  def __init__(self, pre, name):
    self.pre, self.name = pre, name

  def __call__(self, ex):
    out = self.pre(ex)
    if out is not None:
      out["source"] = np.str_(self.name)
    return out


def _mixed_train_rows(config, tokenizer, seed: int) -> grain.MapDataset:
  """The global train stream of data.mixture: each source shuffled, repeated, preprocessed, then mixed."""
  d = config.data
  sources = mixture_sources(config)
  parents = []
  for k, (name, split, _) in enumerate(sources):
    source = open_source(name, split, d.data_dir)
    if len(source) == 0:
      raise UserError(f"data.mixture: dataset {name!r} split {split!r} in {d.data_dir} is empty")
    pre = preprocess.Preprocessor(config, tokenizer, train=True, source_name=f"{d.data_dir}/{name}/{split}")
    parents.append(grain.MapDataset.source(source).shuffle(seed=_mix_seed(seed, k)).repeat()
                   .map(_Tagged(pre, f"{name}/{split}")))
  quotas = mix_quotas([w for _, _, w in sources])
  return grain.MapDataset.select_from_datasets(parents, WeightedSelection(quotas, seed))


def make_dataset(config, split, *, tokenizer, train: bool, process_index=None, process_count=None,
                 seed=None):
  d = config.data
  pi = jax.process_index() if process_index is None else int(process_index)
  pc = jax.process_count() if process_count is None else int(process_count)
  if config.train.batch_size % pc:
    raise UserError(f"train.batch_size={config.train.batch_size} is not divisible by {pc} processes")
  B = config.train.batch_size // pc
  seed = int(d.shuffle_seed if seed is None else seed)
  if train and d.mixture:   # preprocessed per source before mixing; the shard takes rows of the mix
    ds = _mixed_train_rows(config, tokenizer, seed)
    if pc > 1:
      ds = _GlobalBatchShard(ds, pi, pc, B)
    return _batched(ds, config, B, train)
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
  return _batched(ds, config, B, train)


def _batched(ds: grain.MapDataset, config, B: int, train: bool):
  """Per-process rows -> batches of B trimmed to a bucket (threads, optional worker processes)."""
  d = config.data
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
