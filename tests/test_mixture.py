"""data.mixture: the weights hold (exactly per block, so well within 3 sigma over 500 rows), the order is a
function of the seed, the iterator resumes exactly (get_state/set_state and through the trainer's orbax
checkpoint), 2 processes read the 1-process global batches, and the counts for logging match the rows."""
import math

import jax.numpy as jnp
import numpy as np
import pytest

from segearth_jax.checkpointing import Checkpointer
from segearth_jax.data.pipeline import (MIX_BLOCK, WeightedSelection, make_dataset, mix_quotas,
                                        mixture_counts, mixture_sources)
from segearth_jax.data.tokenizer import load_tokenizer
from segearth_jax.errors import UserError
from tests import native_fixtures as nf
from tfds_laserss.build import build
from train_fixtures import tiny_config

MIX = (("rrsisd", "train", 0.8), ("refsegrs", "train", 0.2))
B = 4


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, toy_dataset):
  root = tmp_path_factory.mktemp("mix")
  for name, write in (("rrsisd", nf.write_rrsisd), ("refsegrs", nf.write_refsegrs)):
    write(str(root / name))
    build(name, str(root / name), str(root / "tfds"))
  tok = load_tokenizer(toy_dataset["tokenizer"])

  def config(*extra):
    return tiny_config(f"--config.data.data_dir={root / 'tfds'}", f"--config.data.tokenizer={toy_dataset['tokenizer']}",
                       f"--config.data.mixture={MIX!r}", f"--config.train.batch_size={B}", *extra)
  return config, tok


def _rows(it, n_batches):
  return [(s, i) for _ in range(n_batches) for b in [next(it)] for s, i in zip(b["source"], b["example_id"])]


def test_counts_order_and_logging(mixed):
  config, tok = mixed
  c = config()
  n = 500
  rows = _rows(iter(make_dataset(c, "train", tokenizer=tok, train=True, process_index=0, process_count=1)),
               n // B)
  got = {s: sum(r[0] == s for r in rows) for s in ("rrsisd/train", "refsegrs/train")}
  sigma = math.sqrt(n * 0.8 * 0.2)
  assert abs(got["rrsisd/train"] - 0.8 * n) <= 3 * sigma and sum(got.values()) == n
  assert mixture_counts(c, n) == got                        # the logging figure is the rows read
  # each source's rows are its own shuffled epochs: every record of a source once per pass
  rr = [i for s, i in rows if s == "rrsisd/train"]
  assert sorted(rr[:3]) == sorted({i for i in rr})          # rrsisd's train split has 3 records
  # the same seed: the same order; another seed: another order
  k = 25   # batches: 100 rows
  again = _rows(iter(make_dataset(c, "train", tokenizer=tok, train=True, process_index=0, process_count=1)), k)
  assert again == rows[:k * B]
  other = _rows(iter(make_dataset(config("--config.data.shuffle_seed=1"), "train", tokenizer=tok, train=True,
                                  process_index=0, process_count=1)), k)
  assert [s for s, _ in other] != [s for s, _ in rows[:k * B]]


def _batches_equal(a, b):
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_exact_resume(mixed, tmp_path):
  config, tok = mixed
  c = config()
  ds = make_dataset(c, "train", tokenizer=tok, train=True, process_index=0, process_count=1)
  it = iter(ds)
  for _ in range(7):   # an arbitrary position, inside a source's epoch
    next(it)
  state = it.get_state()
  ref = [next(it) for _ in range(3)]
  fresh = iter(ds)
  fresh.set_state(state)
  for want in ref:
    _batches_equal(next(fresh), want)
  # through the trainer's checkpoint (orbax + grain's checkpoint handler), as train.py saves it
  it = iter(ds)
  for _ in range(5):
    next(it)
  ckpt = Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(5, {"x": jnp.zeros(())}, it, force=True)
  ckpt.wait()
  ref = [next(it) for _ in range(2)]
  restored = iter(ds)
  ckpt.restore(5, {"x": jnp.zeros(())}, restored)
  ckpt.close()
  for want in ref:
    _batches_equal(next(restored), want)


def test_two_processes_read_the_global_batches(mixed):
  config, tok = mixed
  c = config()
  one = iter(make_dataset(c, "train", tokenizer=tok, train=True, process_index=0, process_count=1))
  parts = [iter(make_dataset(c, "train", tokenizer=tok, train=True, process_index=p, process_count=2))
           for p in range(2)]
  for _ in range(3):
    g = next(one)
    halves = [next(p) for p in parts]
    for k in ("example_id", "source", "input_ids"):
      np.testing.assert_array_equal(np.concatenate([h[k] for h in halves]), g[k])


def test_no_mixture_is_todays_stream(mixed):
  config, tok = mixed
  c = config("--config.data.mixture=()", "--config.data.name=rrsisd")
  b = next(iter(make_dataset(c, "train", tokenizer=tok, train=True, process_index=0, process_count=1)))
  assert "source" not in b and b["example_id"].shape == (B,)


def test_selection_map():
  q = mix_quotas([0.8, 0.2])
  assert q == (800, 200) and mix_quotas([1 / 3, 1 / 3, 1 / 3]) == (334, 333, 333)
  sel = WeightedSelection(q, seed=3)
  picks = [sel[k] for k in range(3 * MIX_BLOCK + 17)]
  for b in range(3):   # every block holds the quotas exactly, in a seeded order
    src = [s for s, _ in picks[b * MIX_BLOCK:(b + 1) * MIX_BLOCK]]
    assert (src.count(0), src.count(1)) == q
  assert [s for s, _ in picks[:MIX_BLOCK]] != [s for s, _ in picks[MIX_BLOCK:2 * MIX_BLOCK]]
  for s in (0, 1):     # each source's rows are taken in order, none skipped, none twice
    idx = [i for t, i in picks if t == s]
    assert idx == list(range(len(idx)))
  assert sel.counts(len(picks)) == [sum(t == s for t, _ in picks) for s in (0, 1)]
  assert [sel[k] for k in (2500, 17, 2500)] == [picks[2500], picks[17], picks[2500]]   # random access


@pytest.mark.parametrize("mix", [(("rrsisd", "train"),), (("rrsisd", "train", 0.0),), (("rrsisd", "train", -1),),
                                 (("rrsisd", "train", 1.0), ("rrsisd", "train", 1.0)),
                                 (("rrsisd", "train", 1.0), ("refsegrs", "train", 1e-5))])
def test_bad_mixtures(mix):
  c = tiny_config()
  c.data.mixture = mix
  with pytest.raises(UserError, match="data.mixture"):
    mixture_sources(c)
