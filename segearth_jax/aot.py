"""Ahead-of-time compile of the real sharded train step for a TPU slice, on a CPU host.

Needs libtpu (`pip install -e .[tpu]`); no TPU is touched: `jax.experimental.topologies` describes the
slice, the step is lowered with the config's mesh over those devices and compiled by libtpu's compiler.
Reports per-chip memory (arguments, outputs, temporaries) from the executable and FLOPs (XLA's count,
which sees a scanned layer once, and the formula in flops.py).
"""
from __future__ import annotations

import json
import os
import resource
import time

import jax

from segearth_jax import sharding as shd
from segearth_jax.config import load_config
from segearth_jax.data.batch import device_part, dummy_batch
from segearth_jax.errors import UserError
from segearth_jax.flops import train_flops_per_sample
from segearth_jax.presets import image_tokens
from segearth_jax.train import TrainSetup

# per-chip HBM (GiB) and the host block of chips used by the topology description
TPU_CHIPS = {
    "v4": dict(hbm_gib=32, chips_per_host=(2, 2, 1), platform_kind="TPU v4"),
    "v5e": dict(hbm_gib=16, chips_per_host=(2, 2, 1), platform_kind="TPU v5 lite"),
    "v5p": dict(hbm_gib=95, chips_per_host=(2, 2, 1), platform_kind="TPU v5"),
    "v6e": dict(hbm_gib=32, chips_per_host=(2, 2, 1), platform_kind="TPU v6 lite"),
}


def parse_topology(topology: str) -> tuple[str, tuple[int, ...]]:
  try:
    gen, dims = topology.split(":")
    shape = tuple(int(x) for x in dims.lower().split("x"))
  except ValueError:
    raise UserError(f"--topology {topology!r}: expected GEN:AxB[xC], e.g. v5p:4x4x4 or v5e:16x16")
  if gen not in TPU_CHIPS:
    raise UserError(f"--topology {topology!r}: unknown TPU generation {gen!r}; known: {sorted(TPU_CHIPS)}")
  return gen, shape


def topology_devices(topology: str):
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no GCE metadata server on a CPU host
  # libtpu takes a per-host lock file; compiling needs no chip, so several processes may load it
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies

  gen, shape = parse_topology(topology)
  bounds = TPU_CHIPS[gen]["chips_per_host"]
  if len(shape) == 2:
    bounds = bounds[:2] + (1,)
  try:
    desc = topologies.get_topology_desc(platform="tpu", topology_name=topology, chip_config_name="default",
                                        chips_per_host_bounds=bounds, num_slices=1,
                                        wrap=(False,) * 3)
  except Exception as e:  # no libtpu, or a name libtpu does not know
    raise UserError(f"cannot describe TPU topology {topology!r} ({type(e).__name__}: {str(e)[:200]}); "
                    "is libtpu installed (pip install -e .[tpu])?")
  return desc.devices


def compile_train_step(config, topology: str) -> dict:
  gen, _ = parse_topology(topology)
  devices = topology_devices(topology)
  mesh = shd.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices=devices)
  setup = TrainSetup.create(config, mesh=mesh)
  state, frozen = setup.abstract
  length = max(config.data.text_buckets)
  batch = device_part(dummy_batch(config, config.train.batch_size, length))
  abatch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=setup.batch_sharding(v.ndim))
            for k, v in batch.items()}
  step = setup.jit_train_step(batch)
  t0 = time.perf_counter()
  with shd.in_mesh(mesh):
    lowered = step.lower(state, frozen, abatch)
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    # the compiler refuses a step that cannot fit: that is the answer, not a crash
    return dict(topology=topology, chips=len(devices), mesh=dict(mesh.shape), batch=config.train.batch_size,
                seq_len=length, fits=False, hbm_gib=TPU_CHIPS[gen]["hbm_gib"], compiler=str(e).splitlines()[0][:300])
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  gib = 1 << 30
  per_chip = dict(arguments_gib=mem.argument_size_in_bytes / gib, outputs_gib=mem.output_size_in_bytes / gib,
                  temps_gib=mem.temp_size_in_bytes / gib, aliased_gib=mem.alias_size_in_bytes / gib,
                  code_gib=mem.generated_code_size_in_bytes / gib)
  total = per_chip["arguments_gib"] + per_chip["outputs_gib"] - per_chip["aliased_gib"] + per_chip["temps_gib"]
  formula = train_flops_per_sample(config.model, length - image_tokens(config.model), config.train.trainable)
  return dict(topology=topology, chips=len(devices), mesh=dict(mesh.shape), batch=config.train.batch_size,
              seq_len=length, per_chip=per_chip, per_chip_total_gib=total, hbm_gib=TPU_CHIPS[gen]["hbm_gib"],
              fits=bool(total <= TPU_CHIPS[gen]["hbm_gib"]),
              xla_flops_per_chip=float(cost.get("flops", float("nan"))) if cost else None,
              formula_flops_per_step=formula * config.train.batch_size,
              formula_flops_per_chip=formula * config.train.batch_size / len(devices),
              compile_s=round(compile_s, 1),
              host_peak_rss_gib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20), 2))


def cli_main(args) -> int:
  if not os.environ.get("JAX_PLATFORMS"):  # compiling for the slice needs no local accelerator
    jax.config.update("jax_platforms", "cpu")
  config = load_config(args.config, args.overrides)
  print(json.dumps(compile_train_step(config, args.topology), indent=2))
  return 0
