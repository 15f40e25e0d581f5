"""bench: the synthetic batch keeps the pipeline's contract; the benchmarked train step (bf16 compute,
fused attention, L_S on) runs end to end on CPU with float32 params and no host transfer inside."""
import jax
import numpy as np

from segearth_jax import sharding as shd
from segearth_jax.bench import bench_train, host_transfers, synthetic_batch
from segearth_jax.flops import PEAK_FLOPS, peak_flops
from segearth_jax.data.batch import dummy_batch
from train_fixtures import tiny_config

# bf16 + fused attention + no remat: the GPU fast-path settings of experiments/bench_h100.py, tiny.
FAST = ["--config.model.vision.num_hidden_layers=1", "--config.model.llm.num_hidden_layers=1",
        "--config.model.mask_decoder.num_layers=1", "--config.model.remat_policy=none",
        "--config.model.dtype=bfloat16", "--config.model.attention_impl=fused", "--config.loss.num_points=64",
        "--config.data.text_buckets=(64,)", "--config.data.max_len=64"]


def test_synthetic_batch_contract():
  config = tiny_config()
  ref = dummy_batch(config, 3)
  b = synthetic_batch(config, 3)
  assert {k: (v.shape, v.dtype) for k, v in b.items()} == {k: (v.shape, v.dtype) for k, v in ref.items()}
  m = config.model
  n_img = (m.vision.image_size // m.vision.patch_size) ** 2
  valid = b["attention_mask"].sum(1)
  for i in range(3):
    pos = b["seg_positions"][i][b["seg_valid"][i]]
    assert len(pos) == 2
    assert np.all(pos > 1 + n_img) and np.all(pos < valid[i])            # [SEG]s are answer text tokens
    assert np.all(b["labels"][i, : 1 + n_img] == -100)                     # no loss on the image slots
    assert np.all(b["labels"][i, pos] == b["input_ids"][i, pos])
    for k in range(2):
      assert b["masks"][i, k].sum() > 0 and b["mask_grid"][i, k].sum() > 0
    assert b["masks"][i][~b["seg_valid"][i]].sum() == 0


def test_peak_flops_table():
  class Dev:
    platform = "gpu"
    device_kind = "NVIDIA H100 80GB HBM3"
  assert peak_flops(Dev()) == 989e12
  Dev.device_kind = "NVIDIA H100 PCIe"
  assert peak_flops(Dev()) == 756e12
  Dev.platform, Dev.device_kind = "tpu", "TPU v5 lite"
  assert peak_flops(Dev()) == 197e12
  assert peak_flops(jax.devices()[0]) is None                             # CPU: no MFU
  assert all(v > 1e13 for _, v in PEAK_FLOPS)


def test_bench_train_bf16_fused_end_to_end():
  config = tiny_config(*FAST)
  mesh = shd.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  r = bench_train(config, batch=2, steps=1, warmup=1, mesh=mesh)
  assert r["finite"] and np.isfinite(r["loss"]) and r["ls"] > 0            # L_S is on and computed
  assert r["dtype"] == "bfloat16" and r["attention_impl"] == "fused"
  assert r["trainable_param_dtypes"] == ["float32"]                        # params stay float32
  assert r["host_transfers_in_step"] == 0
  assert r["samples_per_s"] > 0 and r["flops_per_sample_formula"] > 0
  assert r["xla_flops_per_step_per_device"] > 0
  assert r["mfu"] is None and r["peak_flops_per_device"] is None


def test_host_transfers_counts_callbacks():
  def f(x):
    jax.debug.callback(lambda v: None, x)
    return x + 1
  x = np.ones(3, np.float32)
  assert host_transfers(jax.jit(f).lower(x).compile()) >= 1
  assert host_transfers(jax.jit(lambda x: x + 1).lower(x).compile()) == 0


def test_summarize_trace(tmp_path):
  from segearth_jax.bench import summarize_trace
  f = jax.jit(lambda x: (x @ x.T).sum())
  x = np.ones((64, 64), np.float32)
  f(x).block_until_ready()
  with jax.profiler.trace(str(tmp_path)):
    f(x).block_until_ready()
  s = summarize_trace(str(tmp_path), top=5)
  assert s["planes"] and 0 < len(s["top"]) <= 5 and s["total_ms"] > 0
  assert s["top"][0]["ms"] >= s["top"][-1]["ms"]


def test_training_throughput_logs_tokens_and_mfu_by_formula():
  """train.Throughput: samples/s, real tokens/s and MFU = formula FLOPs x samples/s / (peak x chips); on a
  CPU there is no peak and no MFU."""
  from segearth_jax.flops import train_flops_per_sample
  from segearth_jax.presets import image_tokens
  from segearth_jax.train import Throughput

  config = tiny_config()
  host = dict(attention_mask=np.zeros((8, 128), np.int32), input_ids=np.zeros((8, 128), np.int32))
  host["attention_mask"][:, :100] = 1
  t = Throughput(config, n_devices=8)
  assert t.peak is None and t.peak_basis is None
  m = t.metrics(t.of(host), dt=2.0)
  assert m == dict(samples_per_s=4.0, tokens_per_s=400.0)
  t.peak = 1e12                                   # as on a chip with a known peak
  m = t.metrics(t.of(host), dt=2.0)
  want = train_flops_per_sample(config.model, 128 - image_tokens(config.model), config.train.trainable)
  assert m["mfu"] == want * 4.0 / (1e12 * 8)
