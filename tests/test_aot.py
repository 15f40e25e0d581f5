"""AOT compile of the real sharded train step for a TPU slice on this CPU host (libtpu's compiler)."""
import pytest

from segearth_jax.aot import compile_train_step, parse_topology
from segearth_jax.errors import UserError
from train_fixtures import tiny_config


def test_compile_tiny_for_v5e_2x2():
  config = tiny_config("--config.mesh.data=1", "--config.mesh.fsdp=4", "--config.train.batch_size=4",
                       "--config.model.vision.num_hidden_layers=1", "--config.model.llm.num_hidden_layers=1",
                       "--config.model.mask_decoder.num_layers=1", "--config.data.text_buckets=(64,)",
                       "--config.data.max_len=64", "--config.loss.num_points=64")
  r = compile_train_step(config, "v5e:2x2")
  assert r["chips"] == 4 and r["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
  assert r["per_chip"]["arguments_gib"] > 0 and r["per_chip"]["temps_gib"] > 0
  assert 0 < r["per_chip_total_gib"] < r["hbm_gib"] and r["fits"] is True
  assert r["xla_flops_per_chip"] > 0 and r["formula_flops_per_chip"] > 0
  assert r["formula_flops_per_step"] == pytest.approx(4 * r["formula_flops_per_chip"])


def test_bad_topology_names_the_flag():
  with pytest.raises(UserError, match="--topology 'v5e-16'"):
    parse_topology("v5e-16")
  with pytest.raises(UserError, match="unknown TPU generation 'v9'"):
    parse_topology("v9:2x2")
