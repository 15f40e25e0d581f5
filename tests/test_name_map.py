import numpy as np
import pytest

from segearth_jax.convert.name_map import CONV2D, LINEAR, ConversionError, NameMap, Rule
from segearth_jax.tensor_io import SafetensorsReader, save_safetensors


def _map():
  return NameMap([Rule("layers/q/kernel", "model.layers.{i}.q.weight", LINEAR, stack="i"),
                  Rule("layers/q/bias", "model.layers.{i}.q.bias", stack="i"),
                  Rule("stem/kernel", "stem.weight", CONV2D),
                  Rule("blocks_{j}/w", "blocks.{j}.w")], ignore=[r".*\.position_ids"])


def _theirs(rng, layers=3):
  t = {f"model.layers.{i}.q.weight": rng.normal(size=(5, 4)).astype(np.float32) for i in range(layers)}
  t.update({f"model.layers.{i}.q.bias": rng.normal(size=(5,)).astype(np.float32) for i in range(layers)})
  t["stem.weight"] = rng.normal(size=(8, 3, 2, 2)).astype(np.float32)
  t.update({f"blocks.{j}.w": rng.normal(size=(2,)).astype(np.float32) for j in range(2)})
  t["emb.position_ids"] = np.arange(4)
  return t


def test_round_trip_is_bit_exact_and_stacks_layers(tmp_path):
  theirs = _theirs(np.random.default_rng(0))
  ours = _map().to_ours(theirs.keys(), theirs.__getitem__)
  assert ours["layers"]["q"]["kernel"].shape == (3, 4, 5)          # layer axis first, (in, out)
  assert ours["stem"]["kernel"].shape == (2, 2, 3, 8)              # HWIO
  back = dict(_map().to_theirs(ours))
  assert set(back) == set(theirs) - {"emb.position_ids"}
  for k, v in back.items():
    np.testing.assert_array_equal(v, theirs[k])
  save_safetensors(back.items(), str(tmp_path), max_shard_bytes=64)  # forces several shards + index
  reader = SafetensorsReader(str(tmp_path))
  assert sorted(reader.keys()) == sorted(back)
  np.testing.assert_array_equal(reader.get("stem.weight"), theirs["stem.weight"])


def test_unclaimed_missing_and_short_layers_are_errors():
  theirs = _theirs(np.random.default_rng(1))
  with pytest.raises(ConversionError, match="no rule"):
    _map().to_ours(list(theirs) + ["extra.weight"], lambda k: theirs.get(k, np.zeros(1)))
  del theirs["model.layers.2.q.bias"]                             # last layer lacks one tensor
  with pytest.raises(ConversionError, match="layers missing"):
    _map().to_ours(theirs.keys(), theirs.__getitem__)
  del theirs["model.layers.1.q.bias"]
  with pytest.raises(ConversionError):
    _map().to_ours(theirs.keys(), theirs.__getitem__)
