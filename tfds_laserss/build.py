"""`segearth data build NAME --manual-dir DIR --data-dir OUT [--skip-bad]`: TensorFlow-free building.

`tfds build` works on the same builders where TensorFlow is installed (its command line imports TF).
"""
from __future__ import annotations

import os
import shutil

import tensorflow_datasets as tfds

from segearth_jax.errors import UserError
from tfds_laserss import BUILDERS


def build(name: str, manual_dir, data_dir, skip_bad: bool = False):
  """Builds dataset `name` from `manual_dir` into `data_dir`; returns the builder (`.skipped` lists the
  records skipped with skip_bad). A failed build leaves no half-written version behind."""
  if name not in BUILDERS:
    raise UserError(f"unknown dataset {name!r}; choose one of {sorted(BUILDERS)}")
  manual_dir, data_dir = os.fspath(manual_dir), os.fspath(data_dir)
  if not os.path.isdir(manual_dir):
    raise UserError(f"--manual-dir {manual_dir} does not exist")
  builder = BUILDERS[name](data_dir=data_dir, skip_bad=skip_bad)
  try:
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  except UserError:
    _remove_incomplete(builder)
    raise
  except AssertionError as e:  # tfds refuses a split whose every record was skipped
    _remove_incomplete(builder)
    if "No examples were yielded" not in str(e):
      raise
    raise UserError(f"{name}: {e}; every record of that split is bad.\n{builder.skipped.summary()}") from e
  return builder


def _remove_incomplete(builder):
  parent = os.path.dirname(os.fspath(builder.data_dir))
  if os.path.isdir(parent):
    for d in os.listdir(parent):
      if d.startswith("incomplete."):
        shutil.rmtree(os.path.join(parent, d), ignore_errors=True)


def cli_main(args) -> int:
  builder = build(args.name, args.manual_dir, args.data_dir, skip_bad=args.skip_bad)
  counts = {s: info.num_examples for s, info in builder.info.splits.items()}
  print(f"built {args.name} {builder.info.version} in {builder.data_dir}: {counts}")
  if args.skip_bad:
    print(builder.skipped.summary())
  return 0
