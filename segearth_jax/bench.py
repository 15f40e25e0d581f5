"""Benchmarks of the real train step and of predict, on a random-init model (one JSON line each).

Nothing here reads data: batches are synthetic with the input pipeline's contract (data.batch.dummy_batch
shapes, [SEG] rows, masks); no dataset or tokenizer is needed. The scene benchmark (``bench_scene``,
`segearth bench predict --scene-factor N`) writes a synthetic GeoTIFF and trains a throwaway toy tokenizer
for the prompt.

MFU = model FLOPs per second / (peak dense bf16 FLOP/s per device x devices). Model FLOPs come from the
formula in flops.py (no remat recompute, frozen towers forward only). XLA's cost analysis of the compiled
step is reported beside it (`xla_flops_per_step`, per device): it includes remat recompute but counts the
body of a scan (the scanned layer stacks) once, so it is not used for MFU.

`python -m segearth_jax.bench profile|attention ...` adds a profiler trace summary and an attention
micro-benchmark (XLA vs cuDNN at the model's shapes) for tools/gpu_bench.sh; `... mosaics --model W
--mosaics DIR --out DIR` the quality of tiled large scenes on the toy mosaics (bench_mosaics).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import resource
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from segearth_jax import geo
from segearth_jax import sharding as shd
from segearth_jax.config import load_config
from segearth_jax.data import rle
from segearth_jax.data.batch import IGNORE, device_part, dummy_batch
from segearth_jax.data.tokenizer import seg_token_id, train_toy_tokenizer
from segearth_jax.flops import peak_flops, train_flops_per_sample
from segearth_jax.metrics import IoUAccumulator
from segearth_jax.model_setup import ModelSetup
from segearth_jax.predict import make_predict_fn
from segearth_jax.presets import image_grid, image_tokens
from segearth_jax.segment import Segmenter
from segearth_jax.tiling import tile_windows
from segearth_jax.train import TrainSetup

TEXT_TOKENS = 100   # prompt + answer tokens after the image, as the PyTorch peer
SEGS_PER_SAMPLE = 2  # [SEG] tokens per sample, as the PyTorch peer


def synthetic_batch(config, batch_size: int, length: int | None = None, seed: int = 0) -> dict:
  """A training batch with the pipeline's contract: image at slot 1, TEXT_TOKENS labelled text tokens,
  SEGS_PER_SAMPLE [SEG] rows each with a rectangle mask (canvas) and its image-grid version."""
  rng = np.random.default_rng(seed)
  m = config.model
  b = dummy_batch(config, batch_size, length)
  B, L = b["input_ids"].shape
  G = image_grid(m)
  M, K = m.swin.image_size, m.max_seg
  n_img = G * G
  valid = min(L, 1 + n_img + TEXT_TOKENS)
  first_text = 1 + n_img
  if valid - first_text < SEGS_PER_SAMPLE + 2:
    raise ValueError(f"sequence {L} too short for {n_img} image tokens plus text")
  b["siglip_image"] = rng.normal(size=b["siglip_image"].shape).astype(np.float32)
  b["swin_image"] = rng.normal(size=b["swin_image"].shape).astype(np.float32)
  b["input_ids"] = rng.integers(3, m.llm.vocab_size - 1, size=(B, L)).astype(np.int32)
  b["image_start"][:] = 1
  b["attention_mask"] = (np.arange(L)[None] < valid).repeat(B, 0).astype(np.int32)
  slots = np.arange(L)[None].repeat(B, 0)
  b["labels"] = np.where((slots >= first_text) & (slots < valid), b["input_ids"], IGNORE).astype(np.int32)
  n_seg = min(SEGS_PER_SAMPLE, K)
  b["seg_positions"][:] = 0
  b["seg_valid"][:] = False
  b["masks"][:] = 0
  b["mask_grid"][:] = 0
  for i in range(B):
    b["seg_positions"][i, :n_seg] = valid - 2 * np.arange(n_seg, 0, -1)  # answer tail: '... [SEG] , [SEG] .'
    b["seg_valid"][i, :n_seg] = True
    for k in range(n_seg):
      y0, x0 = rng.uniform(0, 0.5, size=2)
      y1, x1 = y0 + rng.uniform(0.1, 0.5), x0 + rng.uniform(0.1, 0.5)
      b["masks"][i, k, int(y0 * M):int(y1 * M), int(x0 * M):int(x1 * M)] = 1
      b["mask_grid"][i, k, int(y0 * G):max(int(y1 * G), int(y0 * G) + 1),
                     int(x0 * G):max(int(x1 * G), int(x0 * G) + 1)] = 1.0
  return b


def _device_peak_bytes() -> int | None:
  stats = [d.memory_stats() for d in jax.local_devices()]
  peaks = [s.get("peak_bytes_in_use") for s in stats if s]
  return max(peaks) if peaks and all(p is not None for p in peaks) else None


def _cost_flops(compiled) -> float | None:
  try:
    cost = compiled.cost_analysis()
  except Exception:  # not every backend has it
    return None
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"]) if cost and "flops" in cost else None


def _memory(compiled) -> dict | None:
  try:
    mem = compiled.memory_analysis()
  except Exception:
    return None
  if mem is None:
    return None
  gib = 1 << 30
  return dict(arguments_gib=round(mem.argument_size_in_bytes / gib, 3),
              temps_gib=round(mem.temp_size_in_bytes / gib, 3),
              outputs_gib=round(mem.output_size_in_bytes / gib, 3),
              aliased_gib=round(mem.alias_size_in_bytes / gib, 3))


def host_transfers(compiled) -> int:
  """HLO ops of the compiled step that talk to the host (Python callbacks, infeed/outfeed, send/recv):
  each would make the device wait on the host. The step should have none."""
  pattern = re.compile(r"custom_call_target=\"[^\"]*callback|\b(?:infeed|outfeed|send|recv)\(")
  return sum(1 for line in compiled.as_text().splitlines() if pattern.search(line))


def bench_train(config, batch: int | None = None, steps: int = 10, warmup: int = 2, *, mesh=None,
                profile_dir: str | None = None, profile_steps: int = 3) -> dict:
  """Times the real jitted train step (state donated) on synthetic batches; see the module doc."""
  B = int(batch or config.train.batch_size)
  setup = TrainSetup.create(config, mesh=mesh)
  L = max(config.data.text_buckets)
  host = device_part(synthetic_batch(config, B, L))
  t0 = time.perf_counter()
  state, frozen = setup.init_state(int(config.train.seed))
  jax.block_until_ready((state, frozen))
  init_s = time.perf_counter() - t0
  gbatch = jax.device_put(host, setup.batch_shardings(host))
  step = setup.jit_train_step(host)
  with shd.in_mesh(setup.mesh):
    t0 = time.perf_counter()
    compiled = step.lower(state, frozen, gbatch).compile()
    compile_s = time.perf_counter() - t0
    for _ in range(warmup):
      state, metrics = compiled(state, frozen, gbatch)
    jax.block_until_ready((state, metrics))
    t0 = time.perf_counter()
    for _ in range(steps):  # no host sync inside: the next step is dispatched while this one runs
      state, metrics = compiled(state, frozen, gbatch)
    jax.block_until_ready((state, metrics))
    step_s = (time.perf_counter() - t0) / steps
    if profile_dir:  # a few more steps under the profiler, after (and not part of) the timing
      jax.profiler.start_trace(profile_dir)
      for _ in range(profile_steps):
        state, metrics = compiled(state, frozen, gbatch)
      jax.block_until_ready((state, metrics))
      jax.profiler.stop_trace()
  metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
  param_dtypes = sorted({str(x.dtype) for x in jax.tree.leaves(state["params"])})
  n_dev = setup.mesh.devices.size
  formula = train_flops_per_sample(config.model, L - image_tokens(config.model), config.train.trainable)
  xla = _cost_flops(compiled)
  peak = peak_flops(jax.devices()[0])
  sps = B / step_s
  mfu = formula * sps / (peak * n_dev) if peak else None
  mfu_xla = xla / step_s / peak if (peak and xla) else None  # xla flops are per device
  peak_bytes = _device_peak_bytes()
  m = config.model
  return dict(
      bench="train", device_kind=jax.devices()[0].device_kind, devices=n_dev, batch=B, seq_len=L,
      dtype=m.dtype, attention_impl=m.attention_impl, remat_policy=m.remat_policy,
      lambda_s=float(config.loss.lambda_s), steps=steps,
      step_s=round(step_s, 5), samples_per_s=round(sps, 3), compile_s=round(compile_s, 2),
      init_s=round(init_s, 2),
      flops_per_sample_formula=formula, xla_flops_per_step_per_device=xla,
      peak_flops_per_device=peak, mfu_basis="formula model FLOPs / (peak dense bf16 x devices)",
      mfu=round(mfu, 4) if mfu is not None else None,
      mfu_xla=round(mfu_xla, 4) if mfu_xla is not None else None,
      peak_mem_gib=round(peak_bytes / (1 << 30), 2) if peak_bytes is not None else None,
      compiled_memory=_memory(compiled),
      host_transfers_in_step=host_transfers(compiled), trainable_param_dtypes=param_dtypes,
      loss=metrics["loss"], ls=metrics.get("ls"), finite=bool(metrics["finite"]))


def bench_predict(config, steps: int = 5, max_new_tokens: int | None = None) -> dict:
  """Seconds per instruction at batch 1: SigLIP + prefill of image + TEXT_TOKENS prompt tokens, greedy
  generation of exactly max_new_tokens tokens (EOS id -1 is never an argmax, so random weights always run
  the full length: a fixed cost per instruction), then masks for max_seg queries."""
  T = int(max_new_tokens or config.infer.max_new_tokens)
  mesh = shd.single_device_mesh()
  setup = ModelSetup.create(config, mesh=mesh)
  params = setup.init_params(int(config.train.seed))
  m = config.model
  n_img = image_tokens(m)
  prompt = 1 + n_img + TEXT_TOKENS
  P = -(-prompt // 64) * 64  # prompt bucket
  rng = np.random.default_rng(0)
  S, M = m.vision.image_size, m.swin.image_size
  batch = dict(siglip_image=rng.normal(size=(1, S, S, 3)).astype(np.float32),
               swin_image=rng.normal(size=(1, M, M, 3)).astype(np.float32),
               input_ids=rng.integers(3, m.llm.vocab_size - 1, size=(1, P)).astype(np.int32),
               image_start=np.ones((1,), np.int32), prompt_len=np.full((1,), prompt, np.int32))
  predict = make_predict_fn(setup, eos_id=-1, seg_id=int(m.llm.vocab_size) - 1, max_new_tokens=T)
  key = jax.random.key(0)
  with shd.in_mesh(mesh):
    t0 = time.perf_counter()
    compiled = predict.lower(params, batch, key).compile()
    compile_s = time.perf_counter() - t0
    out = jax.block_until_ready(compiled(params, batch, key))
    t0 = time.perf_counter()
    for _ in range(steps):  # one instruction at a time, as a user would: wait for each answer
      out = jax.block_until_ready(compiled(params, batch, key))
    s = (time.perf_counter() - t0) / steps
  peak_bytes = _device_peak_bytes()
  return dict(bench="predict", device_kind=jax.devices()[0].device_kind, prompt_tokens=prompt,
              prompt_bucket=P, new_tokens=int(np.asarray(out["lengths"])[0]), max_new_tokens=T,
              max_seg=int(m.max_seg), dtype=m.dtype, attention_impl=m.attention_impl, steps=steps,
              s_per_instruction=round(s, 4), compile_s=round(compile_s, 2),
              peak_mem_gib=round(peak_bytes / (1 << 30), 2) if peak_bytes is not None else None)


def _rss_mib() -> float:
  """The process's resident set now (Linux /proc), MiB."""
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / (1 << 20)


def _peak_rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # Linux: KiB


def write_synthetic_scene(path: str, height: int, width: int, seed: int = 0, rows_per_write: int = 256) -> None:
  """A uint8 3-band UTM GeoTIFF of random blobs, written strip by strip (its own memory stays small)."""
  import rasterio   # the geo extra (optional)
  import rasterio.windows
  from rasterio.transform import from_origin

  rng = np.random.default_rng(seed)
  with rasterio.open(path, "w", driver="GTiff", height=height, width=width, count=3, dtype="uint8",
                     crs="EPSG:32632", transform=from_origin(500000.0, 5600000.0, 1.0, 1.0), tiled=True,
                     blockxsize=256, blockysize=256) as ds:
    for r0 in range(0, height, rows_per_write):
      h = min(rows_per_write, height - r0)
      strip = rng.integers(0, 256, size=(3, h, width), dtype=np.uint8)
      ds.write(strip, window=rasterio.windows.Window(0, r0, width, h))


def bench_scene(config, scene_factor: int, steps: int = 1, overlap: int | None = None,
                max_new_tokens: int | None = None) -> dict:
  """Seconds per scene and peak host RSS of Segmenter.segment_scene, tiled, on a synthetic GeoTIFF of
  ``scene_factor`` x the canvas area (square), written to a temporary folder with its outputs (mask
  GeoTIFFs, targets.geojson). Random weights with the [SEG] logit raised: every generated token is a
  [SEG], so all max_seg slots decode masks on every tile (the mask head's worst case) and generation runs
  max_new_tokens steps. One untimed run first (compiles), then ``steps`` timed runs. Run one factor per
  process: ru_maxrss is the peak of the whole process."""
  rss_start = _rss_mib()
  if max_new_tokens:
    config.infer.max_new_tokens = int(max_new_tokens)
  M = int(config.model.swin.image_size)
  side = int(round(M * scene_factor ** 0.5))
  with tempfile.TemporaryDirectory() as tmp:
    tokenizer = train_toy_tokenizer(["segment the airplanes in the scene"] * 4, os.path.join(tmp, "tok"),
                                    vocab_size=300)
    setup = ModelSetup.create(config, mesh=shd.make_mesh(1, 1, 1, devices=jax.local_devices()[:1]),
                              vocab_size=len(tokenizer))
    params = setup.init_params(int(config.train.seed))
    bias = params["llm"]["lm_head"]["bias"]
    params["llm"]["lm_head"]["bias"] = bias.at[seg_token_id(tokenizer)].set(1e3)
    segmenter = Segmenter(setup, params, tokenizer)
    scene = os.path.join(tmp, "scene.tif")
    write_synthetic_scene(scene, side, side)
    rss_model = _rss_mib()
    t0 = time.perf_counter()
    summary = segmenter.segment_scene(scene, "segment the airplanes", os.path.join(tmp, "warm"), tiles="on",
                                      overlap=overlap)
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(steps):
      segmenter.segment_scene(scene, "segment the airplanes", os.path.join(tmp, f"run{i}"), tiles="on",
                              overlap=overlap)
    s = (time.perf_counter() - t0) / steps
  overlap = summary["overlap"]
  return dict(bench="predict_scene", device_kind=jax.devices()[0].device_kind, scene_factor=int(scene_factor),
              scene=[side, side], canvas=M, overlap=overlap, tiles=len(tile_windows(side, side, M, overlap)),
              targets=len(summary["phrases"]), max_new_tokens=int(config.infer.max_new_tokens),
              dtype=config.model.dtype, steps=steps, s_per_scene=round(s, 3), first_run_s=round(first_s, 2),
              rss_start_mib=round(rss_start, 1), rss_model_mib=round(rss_model, 1),
              rss_end_mib=round(_rss_mib(), 1), peak_rss_mib=round(_peak_rss_mib(), 1),
              compiles=segmenter.compiles)


def _quadrants(array: np.ndarray) -> list[np.ndarray]:
  """A 2x2 toy mosaic (or a mask of it) -> its four scenes, row-major (toy/mosaic.py's layout)."""
  h, w = array.shape[0] // 2, array.shape[1] // 2
  return [array[r:r + h, c:c + w] for r in (0, h) for c in (0, w)]


def bench_mosaics(segmenter: Segmenter, mosaic_dir: str, out_dir: str, *, overlap: int | None = None,
                  limit: int | None = None) -> dict:
  """gIoU/cIoU on the toy mosaics (toy/mosaic.py: annotations/single.json and mosaic.json).

  On the mosaic (one unit per [SEG] of a mosaic record, GT the union): 'tiled' segment_scene tiles='on' with
  the overview's [SEG] states, 'tiled_checked' tiles='on', tile_check=True (windows whose own answer has no
  target stay empty), 'overview' tiles='off' (masks upsampled from the overview).
  Single scenes: 'single' the records of single.json (each scene that holds the class, its own GT);
  'single_quadrants' every mosaic record asked on each of its four scenes alone, GT its quadrant of the
  union (empty where the scene lacks the class: the model must then answer no target or segment nothing),
  and 'tiled_quadrants' the tiled masks scored on the same quadrants: the same units, GT and instruction,
  so their ratio is what tiling costs. ``*_over_single`` are the ratios issue 16 asks to be >= 0.8.
  ``limit``: the first records of each file."""
  ann = os.path.join(mosaic_dir, "annotations")
  with open(os.path.join(ann, "single.json")) as f:
    singles = json.load(f)[:limit]
  with open(os.path.join(ann, "mosaic.json")) as f:
    mosaics = json.load(f)[:limit]
  modes = (("tiled", "on", False), ("tiled_checked", "on", True), ("overview", "off", False))
  acc = {mode: IoUAccumulator() for mode in ("single", "single_quadrants", "tiled_quadrants",
                                             *(m for m, _, _ in modes))}
  images = [os.path.join(mosaic_dir, "images", r["image_name"]) for r in singles]
  for r, seg in zip(singles, segmenter(images, [r["description"] for r in singles])):
    acc["single"].add_record(seg.masks, [rle.decode(m) for m in r["mask"]])
  t0 = time.perf_counter()
  for r in mosaics:
    path = os.path.join(mosaic_dir, "images", r["mosaic"])
    gts = [rle.decode(m) for m in r["mask"]]
    for mode, tiles, check in modes:
      where = os.path.join(out_dir, r["id"], mode)
      summary = segmenter.segment_scene(path, r["description"], where, tiles=tiles, overlap=overlap,
                                        tile_check=check)
      preds = [geo.open_scene(os.path.join(where, f"mask_{i}.tif")).read()[0][..., 0] == 1
               for i in range(len(summary["phrases"]))]
      acc[mode].add_record(preds, gts)
      if mode == "tiled":
        for q in range(4):
          acc["tiled_quadrants"].add_record([_quadrants(p)[q] for p in preds], [_quadrants(g)[q] for g in gts])
    scenes = [np.ascontiguousarray(x) for x in _quadrants(geo.open_scene(path).read()[0])]
    for q, seg in enumerate(segmenter(scenes, [r["description"]] * 4)):
      acc["single_quadrants"].add_record(seg.masks, [_quadrants(g)[q] for g in gts])
  out = {mode: a.summary() for mode, a in acc.items()}

  def ratio(a, b):
    return out[a]["gIoU"] / out[b]["gIoU"] if out[b]["gIoU"] else None

  return dict(bench="mosaics", records=dict(single=len(singles), mosaic=len(mosaics)), **out,
              tiled_over_single=ratio("tiled", "single"), tiled_checked_over_single=ratio("tiled_checked", "single"),
              overview_over_single=ratio("overview", "single"),
              tiled_quadrants_over_single_quadrants=ratio("tiled_quadrants", "single_quadrants"),
              s_per_mosaic_all_modes=round((time.perf_counter() - t0) / max(len(mosaics), 1), 2))


def _load(args):
  return load_config(args.config, getattr(args, "overrides", None) or [])


def train_cli(args) -> int:
  print(json.dumps(bench_train(_load(args), args.batch, args.steps)), flush=True)
  return 0


def predict_cli(args) -> int:
  if args.scene_factor:
    result = bench_scene(_load(args), args.scene_factor, args.steps, args.overlap)
  else:
    result = bench_predict(_load(args), args.steps)
  print(json.dumps(result), flush=True)
  return 0


# ---------------------------------------------------------------------------------- profile summary
def summarize_trace(trace_dir: str, top: int = 25) -> dict:
  """Top ops by total time from the newest .xplane.pb under trace_dir (device planes when present)."""
  paths = []
  for root, _, files in os.walk(trace_dir):
    paths += [os.path.join(root, f) for f in files if f.endswith(".xplane.pb")]
  if not paths:
    return dict(error=f"no .xplane.pb under {trace_dir}")
  data = jax.profiler.ProfileData.from_file(max(paths, key=os.path.getmtime))
  planes = list(data.planes)
  # accelerator planes; '/device:CUSTOM:...' planes (e.g. Megascale) hold no op events
  device = [p for p in planes if p.name.startswith("/device:") and not p.name.startswith("/device:CUSTOM")]
  use = device or [p for p in planes if p.name.startswith("/host:")]
  totals, counts, lines_seen = collections.Counter(), collections.Counter(), set()
  for plane in use:
    for line in plane.lines:
      # on GPU, 'XLA Ops' holds one event per kernel-launching HLO op; other lines double count
      if device and "XLA Ops" not in line.name:
        continue
      lines_seen.add(f"{plane.name}:{line.name}")
      for ev in line.events:
        totals[ev.name] += ev.duration_ns
        counts[ev.name] += 1
  total = sum(totals.values()) or 1
  rows = [dict(op=name, ms=round(ns / 1e6, 3), pct=round(100 * ns / total, 2), count=counts[name])
          for name, ns in totals.most_common(top)]
  return dict(planes=[p.name for p in planes], lines=sorted(lines_seen), total_ms=round(total / 1e6, 3),
              top=rows)


# ---------------------------------------------------------------------------------- attention
def bench_attention(shapes=None, steps: int = 20) -> list[dict]:
  """fwd+bwd time of jax.nn.dot_product_attention, implementation 'xla' vs 'cudnn', at the model's
  shapes in bf16: Phi-2 causal with right padding, and SigLIP (no mask)."""
  shapes = shapes or [dict(name="phi2", B=4, L=832, H=32, D=80, causal=True),
                      dict(name="siglip", B=4, L=729, H=16, D=72, causal=False)]
  rows = []
  for s in shapes:
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    shape = (s["B"], s["L"], s["H"], s["D"])
    q, k, v = (jax.random.normal(kk, shape, jnp.bfloat16) for kk in (k1, k2, k3))
    lengths = jnp.full((s["B"],), s["L"] - 3, jnp.int32)
    for impl in ("xla", "cudnn"):
      def loss(q, k, v, impl=impl, s=s):
        kw = dict(is_causal=True, key_value_seq_lengths=lengths) if s["causal"] else {}
        return jax.nn.dot_product_attention(q, k, v, implementation=impl, **kw).astype(jnp.float32).sum()
      fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
      try:
        jax.block_until_ready(fn(q, k, v))
        t0 = time.perf_counter()
        for _ in range(steps):
          out = fn(q, k, v)
        jax.block_until_ready(out)
        rows.append(dict(bench="attention", shape=s["name"], impl=impl,
                         ms_fwd_bwd=round((time.perf_counter() - t0) / steps * 1e3, 3)))
      except Exception as e:  # cuDNN absent (CPU) or shape unsupported: say why
        rows.append(dict(bench="attention", shape=s["name"], impl=impl, error=f"{type(e).__name__}: {str(e)[:200]}"))
  return rows


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m segearth_jax.bench")
  sub = p.add_subparsers(dest="what", required=True)
  pr = sub.add_parser("profile", help="bench train, then a profiler trace of a few more steps and its top ops")
  pr.add_argument("--config", required=True)
  pr.add_argument("--batch", type=int, default=None)
  pr.add_argument("--steps", type=int, default=10)
  pr.add_argument("--trace-dir", required=True)
  pr.add_argument("--top", type=int, default=25)
  sub.add_parser("attention", help="XLA vs cuDNN attention fwd+bwd at the model's shapes")
  mo = sub.add_parser("mosaics", help="gIoU on toy mosaics: single scenes vs tiled vs overview-only")
  mo.add_argument("--model", required=True, help="a weights folder or training workdir")
  mo.add_argument("--mosaics", required=True, help="the folder `segearth data mosaic` wrote")
  mo.add_argument("--out", required=True, help="folder for the predicted files")
  mo.add_argument("--overlap", type=int, default=None)
  mo.add_argument("--limit", type=int, default=None)
  args, overrides = p.parse_known_args(argv)
  if args.what == "mosaics":
    segmenter = Segmenter.from_pretrained(args.model, overrides=overrides)
    print(json.dumps(bench_mosaics(segmenter, args.mosaics, args.out, overlap=args.overlap, limit=args.limit)),
          flush=True)
  elif args.what == "profile":
    config = _load(argparse.Namespace(config=args.config, overrides=overrides))
    result = bench_train(config, args.batch, args.steps, profile_dir=args.trace_dir)
    print(json.dumps(result), flush=True)
    print(json.dumps(dict(bench="profile", **summarize_trace(args.trace_dir, args.top))), flush=True)
  else:
    for row in bench_attention():
      print(json.dumps(row), flush=True)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
