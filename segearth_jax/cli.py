"""The ``segearth`` command line.

Each subcommand names the function that runs it as 'module:function'; modules are imported only when
their command runs, so ``segearth --help`` is instant and a missing piece says so instead of crashing.
Config overrides (``--config.train.steps=20``) are collected for every command that takes --config.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from segearth_jax.errors import UserError


class _Parser(argparse.ArgumentParser):
  """One-line errors (no usage dump): 'segearth data toy: error: ...'; --help still shows usage."""

  def error(self, message):
    self.exit(2, f"{self.prog}: error: {message}\n")


def _config_args(p: argparse.ArgumentParser, required: bool = True, default: str | None = None):
  p.add_argument("--config", required=required and default is None, default=default,
                 help="experiment file, e.g. experiments/toy.py (or file.py:arg); override fields with "
                      "--config.a.b=value")


def _positive_int(text: str) -> int:
  try:
    v = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
  if v <= 0:
    raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
  return v


def build_parser() -> argparse.ArgumentParser:
  parser = _Parser(
      prog="segearth", description="SegEarth-R2 in JAX: language -> masks for remote-sensing images.")
  sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

  # data ---------------------------------------------------------------------------------------
  data = sub.add_parser("data", help="make, build and look at datasets")
  dsub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
  p = dsub.add_parser("toy", help="write the synthetic toy LaSeRS in the release layout (+ tokenizer)")
  p.add_argument("--out", required=True, help="output folder (created)")
  p.add_argument("--images", type=_positive_int, default=200, help="number of scenes (default 200)")
  p.add_argument("--test-images", type=_positive_int, default=None,
                 help="test scenes (default 20%% of --images); a fixed count keeps the same test set")
  p.add_argument("--val-images", type=_positive_int, default=None, help="val scenes (default 10%% of --images)")
  p.add_argument("--seed", type=int, default=0, help="random seed; same seed, same bytes")
  p.set_defaults(handler="segearth_jax.toy.release:cli_main")
  p = dsub.add_parser("mosaic", help="2x2 mosaics of toy test scenes as GeoTIFFs (UTM) + semantic instructions "
                                     "answered on the whole mosaic (needs the geo extra)")
  p.add_argument("--release", required=True, help="a toy release folder (segearth data toy)")
  p.add_argument("--out", required=True, help="output folder (created)")
  p.add_argument("--n", type=_positive_int, default=8, help="number of mosaics (default 8)")
  p.add_argument("--seed", type=int, default=0, help="random seed (which scenes, which wording)")
  p.set_defaults(handler="segearth_jax.toy.mosaic:cli_main")
  p = dsub.add_parser("build", help="build a TFDS dataset (ArrayRecord, no TensorFlow) from its native layout")
  p.add_argument("name", help="laserss | rrsisd | refsegrs | earthreason")
  p.add_argument("--manual-dir", required=True, help="the unpacked release folder")
  p.add_argument("--data-dir", required=True, help="TFDS data dir to write into")
  p.add_argument("--skip-bad", action="store_true", help="skip bad records, count and report them")
  p.set_defaults(handler="tfds_laserss.build:cli_main")
  p = dsub.add_parser("grid", help="draw a picture grid of examples with their masks")
  p.add_argument("--data", required=True, help="a toy/LaSeRS release folder")
  p.add_argument("--split", default="train")
  p.add_argument("--n", type=_positive_int, default=12)
  p.add_argument("--out", required=True, help="PNG path")
  p.set_defaults(handler="segearth_jax.data.preview:cli_main")

  # train / eval / predict -----------------------------------------------------------------------
  p = sub.add_parser("train", help="train (resumes from --workdir when it has a checkpoint)")
  _config_args(p)
  p.add_argument("--workdir", required=True)
  p.add_argument("--no-resume", action="store_true", help="start fresh even if a checkpoint exists")
  p.set_defaults(handler="segearth_jax.train:cli_main")

  p = sub.add_parser("eval", help="generate, decode masks and score gIoU/cIoU per subset")
  _config_args(p)
  p.add_argument("--workdir", required=True)
  p.add_argument("--split", default="test")
  p.set_defaults(handler="segearth_jax.evaluate:cli_main")

  p = sub.add_parser("predict", help="masks, answer text and an overlay for an image and an instruction")
  p.add_argument("--config", default=None,
                 help="run under this experiment file instead of the run's stored config.json; "
                      "--config.a.b=value overrides apply to whichever config is used")
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--workdir", help="a training workdir (latest checkpoint)")
  src.add_argument("--weights", help="a converted weights folder")
  p.add_argument("--image", help="image file, or a folder of images (batch mode)")
  p.add_argument("--instruction", help="the instruction (with a folder: applied to every image)")
  p.add_argument("--jsonl", help="batch mode: lines of {\"image\": ..., \"instruction\": ...}")
  p.add_argument("--out", default="predictions")
  p.add_argument("--bands", default=None, help="rasters: the 1-based bands shown as RGB, e.g. 4,3,2 (default "
                                               "the red/green/blue colour interpretation, else the first three)")
  p.add_argument("--stretch", default="percentile", choices=("percentile", "minmax", "none"),
                 help="non-uint8 rasters: per-band 2-98 percentile (default), min-max, or none (clip to 0..255)")
  p.add_argument("--tiles", default="auto", choices=("auto", "off", "on"),
                 help="scenes larger than the canvas: answer on an overview, masks on full-resolution tiles "
                      "(auto: when the longer side exceeds the canvas)")
  p.add_argument("--overlap", type=int, default=None, help="pixels between neighbouring tiles (default canvas/4)")
  p.add_argument("--tile-check", action="store_true",
                 help="tiled: each tile answers the instruction too and one that finds no target stays empty "
                      "(for semantic instructions, 'all the airplanes'; one generation per tile)")
  p.add_argument("--simplify", type=float, default=0.0, help="polygon simplification tolerance in pixels")
  p.add_argument("--to-wgs84", action="store_true", help="targets.geojson in EPSG:4326 instead of the source CRS")
  p.set_defaults(handler="segearth_jax.segment:cli_main")

  p = sub.add_parser("serve", help="a local web page to try a model: upload an image, type, see the masks")
  p.add_argument("--config", default=None, help="as for predict: run under this experiment file instead of "
                                                "the stored config.json")
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--workdir", help="a training workdir (latest checkpoint)")
  src.add_argument("--weights", help="a converted weights folder")
  p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
  p.add_argument("--port", type=_positive_int, default=7860, help="default 7860")
  p.add_argument("--max-pixels", type=_positive_int, default=50_000_000,
                 help="largest image accepted, in pixels, checked before decoding (default 50000000)")
  p.add_argument("--max-file-size", default="50mb", help="largest upload accepted (default 50mb)")
  p.set_defaults(handler="segearth_jax.serve:cli_main")

  # convert --------------------------------------------------------------------------------------
  conv = sub.add_parser("convert", help="move checkpoints across the JAX/PyTorch border")
  csub = conv.add_subparsers(dest="convert_command", metavar="ACTION", required=True)
  p = csub.add_parser("from-hf", help="initial checkpoint from Mipha-3B + Mask2Former Swin-B (PyTorch/HF)")
  _config_args(p, required=False)
  p.add_argument("--mipha", required=True, help="Mipha/LLaVA-style HF folder (safetensors)")
  p.add_argument("--mask2former", required=True, help="HF Mask2Former folder or detectron2 .pkl")
  p.add_argument("--out", required=True, help="workdir to write")
  p.set_defaults(handler="segearth_jax.convert.checkpoint:from_hf_cli")
  p = csub.add_parser("from-authors", help="weights folder from the authors' SegEarth-R2 PyTorch checkpoint")
  _config_args(p, required=False)
  p.add_argument("--checkpoint", required=True, help="their checkpoint: folder (safetensors/.bin) or one file")
  p.add_argument("--tokenizer", required=True, help="their tokenizer folder (Phi-2 + [SEG])")
  p.add_argument("--out", required=True, help="weights folder to write")
  p.set_defaults(handler="segearth_jax.convert.authors_map:from_authors_cli")
  p = csub.add_parser("to-torch", help="export a workdir to HF-style safetensors + config")
  p.add_argument("--workdir", required=True)
  p.add_argument("--out", required=True)
  p.add_argument("--merge-lora", action="store_true", help="merge LoRA into the base weights")
  p.set_defaults(handler="segearth_jax.convert.checkpoint:to_torch_cli")

  # bench / compile --------------------------------------------------------------------------------
  bench = sub.add_parser("bench", help="throughput and latency benchmarks (one JSON line each)")
  bsub = bench.add_subparsers(dest="bench_command", metavar="WHAT", required=True)
  p = bsub.add_parser("data", help="examples/s of the full input pipeline")
  _config_args(p)
  p.add_argument("--batches", type=_positive_int, default=20)
  p.set_defaults(handler="segearth_jax.data.pipeline:bench_cli")
  p = bsub.add_parser("train", help="samples/s, step time, MFU, peak memory of the real train step")
  _config_args(p)
  p.add_argument("--batch", type=_positive_int, default=None)
  p.add_argument("--steps", type=_positive_int, default=10)
  p.set_defaults(handler="segearth_jax.bench:train_cli")
  p = bsub.add_parser("predict", help="seconds per instruction (prefill + generation + masks); with "
                                      "--scene-factor, seconds and peak host RSS per tiled GeoTIFF scene")
  _config_args(p)
  p.add_argument("--steps", type=_positive_int, default=5)
  p.add_argument("--scene-factor", type=_positive_int, default=None,
                 help="a synthetic GeoTIFF of this many canvases' area through the tiled path (e.g. 4, 16; "
                      "one factor per process: the RSS peak is the process's)")
  p.add_argument("--overlap", type=int, default=None, help="with --scene-factor: tile overlap (default canvas/4)")
  p.set_defaults(handler="segearth_jax.bench:predict_cli")

  p = sub.add_parser("compile", help="AOT-compile the sharded train step for a TPU slice (needs libtpu)")
  _config_args(p)
  p.add_argument("--topology", required=True, help="e.g. v5p:4x4x4 or v5e:16x16")
  p.set_defaults(handler="segearth_jax.aot:cli_main")

  p = sub.add_parser("demo", help="the `make demo` pipeline: toy data -> ... -> runs/demo report")
  p.add_argument("--out", default="runs/demo")
  p.add_argument("--config", default="experiments/toy.py")
  p.add_argument("--text-config", default="experiments/toy_text.py",
                 help="stage 1, next-token pre-training of the MLLM, whose weights --config starts from "
                      "('' skips it)")
  p.set_defaults(handler="segearth_jax.demo:cli_main")

  p = sub.add_parser("report", help="several runs' eval JSONs as one table in the paper's layout + a chart")
  p.add_argument("runs", nargs="+", metavar="RUN", help="a workdir (its eval/<split>.json) or an eval JSON")
  p.add_argument("--split", default="test", help="which eval/<split>.json of a workdir (default test)")
  p.add_argument("--out", default="report", help="folder for report.md and report.png (default ./report)")
  p.set_defaults(handler="segearth_jax.report:cli_main")
  return parser


def _resolve(handler: str):
  module_name, _, func = handler.partition(":")
  return getattr(importlib.import_module(module_name), func)


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  parser = build_parser()
  args, rest = parser.parse_known_args(argv)
  overrides = [a for a in rest if a.startswith("--config.")]
  unknown = [a for a in rest if not a.startswith("--config.")]
  if unknown:
    parser.error(f"unrecognized arguments: {' '.join(unknown)}")
  if overrides and "config" not in vars(args):
    parser.error(f"{args.command} takes no --config overrides")
  args.overrides = overrides
  try:
    return int(_resolve(args.handler)(args) or 0)
  except UserError as e:
    print(f"segearth: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    return 130


if __name__ == "__main__":
  sys.exit(main())
