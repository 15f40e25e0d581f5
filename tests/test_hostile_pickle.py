"""A `.pkl` whose unpickling would run code (its `__reduce__` writes a file) is refused by every public entry
that reads a `.pkl`: the Swin and Mask2Former importers, the authors' importer, and `segearth convert from-hf
--mask2former`. Each error names the file, and the file the payload would write never appears."""
import builtins
import os
import pickle

import pytest

from convert_fixtures import hf_parts, write_mipha
from train_fixtures import tiny_config

from segearth_jax import cli
from segearth_jax.convert.authors_map import authors_to_ours
from segearth_jax.convert.mask2former import import_mask2former
from segearth_jax.convert.swin_map import import_swin
from segearth_jax.errors import UserError
from segearth_jax.tensor_io import open_checkpoint


class _Opens:
  """Unpickling calls builtins.open(target, 'w'): the file appears."""

  def __init__(self, target):
    self.target = target

  def __reduce__(self):
    return builtins.open, (self.target, "w")


class _Shell:
  """Unpickling calls os.system('touch target')."""

  def __init__(self, target):
    self.target = target

  def __reduce__(self):
    return os.system, (f"touch {self.target}",)


@pytest.fixture(params=[_Opens, _Shell], ids=["builtins.open", "os.system"])
def hostile(request, tmp_path):
  target = tmp_path / "pwned"
  path = tmp_path / "model_final.pkl"
  with open(path, "wb") as f:   # a detectron2 layout around the payload
    pickle.dump({"model": {"backbone.patch_embed.proj.weight": request.param(str(target))}}, f)
  return str(path), target


def _refused(fn, path, target):
  with pytest.raises(UserError, match="not allowed") as e:
    fn(path)
  assert path in str(e.value) and "\n" not in str(e.value)
  assert not target.exists()


def test_importers_refuse_it(hostile):
  path, target = hostile
  for fn in (open_checkpoint, import_swin, import_mask2former, authors_to_ours):
    _refused(fn, path, target)


def test_convert_from_hf_refuses_it(hostile, tmp_path, capsys):
  path, target = hostile
  config = tiny_config()
  mipha = write_mipha(tmp_path / "mipha", hf_parts(config.model), config.model)
  out = tmp_path / "W"
  capsys.readouterr()   # what building the Mipha folder printed
  rc = cli.main(["convert", "from-hf", "--mipha", mipha, "--mask2former", path, "--out", str(out)])
  err = capsys.readouterr().err
  assert rc == 2 and path in err and "not allowed" in err and len(err.strip().splitlines()) == 1, err
  assert not target.exists() and not out.exists()
