"""`segearth convert from-hf` on broken checkpoints: each problem is one line on stderr, exit status 2, no
traceback, naming the file (or folder), the key and what was expected."""
import json
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from convert_fixtures import hf_parts, write_mipha
from train_fixtures import tiny_config

from segearth_jax import cli


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
  """A tiny Mipha folder and HF Mask2Former folder that convert cleanly."""
  tmp = tmp_path_factory.mktemp("good")
  model = tiny_config().model
  parts = hf_parts(model)
  mipha = write_mipha(tmp / "mipha", parts, model)
  parts["mask2former"].save_pretrained(str(tmp / "m2f"))
  return dict(mipha=mipha, m2f=str(tmp / "m2f"))


def _add_tensor(folder: str, key: str) -> None:
  path = os.path.join(folder, "model.safetensors")
  tensors = load_file(path)
  tensors[key] = np.zeros((2, 2), np.float32)
  save_file(tensors, path)


def _edit_json(path: str, edit) -> None:
  with open(path) as f:
    d = json.load(f)
  edit(d)
  with open(path, "w") as f:
    json.dump(d, f)


def _drop_tokenizer(folder: str) -> None:
  for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
    if os.path.exists(os.path.join(folder, name)):
      os.remove(os.path.join(folder, name))


# (name, break the copies (mipha folder, m2f folder), the file / folder named, the other words of the message)
CASES = [
    ("mipha_key", lambda mi, mf: _add_tensor(mi, "model.layers.0.mlp.fc9.weight"), "mipha",
     ["'model.layers.0.mlp.fc9.weight'", "no rule", "closest expected key"]),
    ("mask2former_key", lambda mi, mf: _add_tensor(mf, "transformer_module.decoder.extra.weight"), "m2f",
     ["'transformer_module.decoder.extra.weight'", "no rule", "closest expected key"]),
    ("mipha_config_missing", lambda mi, mf: _edit_json(os.path.join(mi, "config.json"),
                                                        lambda d: d.pop("hidden_size")),
     "mipha/config.json", ["'hidden_size'", "expected int"]),
    ("mipha_config_type", lambda mi, mf: _edit_json(os.path.join(mi, "config.json"),
                                                     lambda d: d["vision_config"]["vision_tower"].update(image_size="42")),
     "mipha/config.json", ["'vision_config.vision_tower.image_size'", "'42'", "expected int"]),
    ("mask2former_config_type", lambda mi, mf: _edit_json(os.path.join(mf, "config.json"),
                                                           lambda d: d["backbone_config"].update(depths="2,2")),
     "m2f/config.json", ["'backbone_config.depths'", "expected a list of ints"]),
    ("no_tokenizer", lambda mi, mf: _drop_tokenizer(mi), "mipha", ["no tokenizer files", "tokenizer.json",
                                                                    "vocab.json + merges.txt"]),
]


@pytest.mark.parametrize("name,breaks,named,words", CASES, ids=[c[0] for c in CASES])
def test_broken_checkpoint_is_one_line_error(sources, tmp_path, capsys, name, breaks, named, words):
  mipha, m2f = str(tmp_path / "mipha"), str(tmp_path / "m2f")
  shutil.copytree(sources["mipha"], mipha)
  shutil.copytree(sources["m2f"], m2f)
  breaks(mipha, m2f)
  capsys.readouterr()
  # no --config: the default (paper) experiment file, with the checkpoints' sizes
  rc = cli.main(["convert", "from-hf", "--mipha", mipha, "--mask2former", m2f, "--out", str(tmp_path / "W")])
  err = capsys.readouterr().err.strip()
  assert rc == 2, err
  assert err.startswith("segearth: error: ") and "\n" not in err and "Traceback" not in err, err
  assert os.path.join(str(tmp_path), named) in err, err
  for w in words:
    assert w in err, (w, err)
  assert not os.path.exists(tmp_path / "W" / "config.json")


def test_default_experiment_converts_a_tiny_checkpoint(sources, tmp_path, capsys):
  """The same command on the unbroken copies succeeds: the paper config's sizes never get in the way."""
  W = str(tmp_path / "W")
  rc = cli.main(["convert", "from-hf", "--mipha", sources["mipha"], "--mask2former", sources["m2f"], "--out", W,
                 "--config.model.lora.rank=2"])
  assert rc == 0, capsys.readouterr().err
  with open(os.path.join(W, "config.json")) as f:
    cfg = json.load(f)
  tiny = tiny_config().model
  assert cfg["model"]["llm"]["hidden_size"] == tiny.llm.hidden_size
  assert cfg["model"]["swin"]["depths"] == list(tiny.swin.depths)
  assert cfg["model"]["lora"]["rank"] == 2
