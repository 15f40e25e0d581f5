import os
import subprocess
import sys

import pytest

from segearth_jax import cli
from segearth_jax.config import ConfigError, load_config


def test_toy_config_loads_and_overrides(repo_root):
  c = load_config(os.path.join(repo_root, "experiments/toy.py"),
                  ["--config.train.steps=20", "--config.loss.lambda_s=0", "--config.data.text_buckets=(64,)"])
  assert c.train.steps == 20
  assert c.loss.lambda_s == 0.0 and isinstance(c.loss.lambda_s, float)
  assert tuple(c.data.text_buckets) == (64,)


@pytest.mark.parametrize("bad", ["--config.train.nosuch=1", "--config.train.steps=abc", "--config.train"])
def test_bad_override_is_a_clear_error(repo_root, bad):
  with pytest.raises(ConfigError):
    load_config(os.path.join(repo_root, "experiments/toy.py"), [bad])


def test_every_experiment_loads(repo_root):
  d = os.path.join(repo_root, "experiments")
  for f in sorted(os.listdir(d)):
    if f.endswith(".py") and not f.startswith("_"):
      c = load_config(os.path.join(d, f))
      assert c.model.llm.hidden_size > 0, f


def test_mipha3b_preset_has_paper_shapes():
  from segearth_jax.presets import model_config
  m = model_config("mipha3b")
  assert (m.vision.hidden_size, m.vision.image_size // m.vision.patch_size) == (1152, 27)
  assert (m.llm.hidden_size, m.llm.num_hidden_layers, m.llm.num_attention_heads) == (2560, 32, 32)
  assert tuple(m.swin.depths) == (2, 2, 18, 2) and m.swin.image_size == 1024
  assert m.mask_decoder.num_layers == 9 and m.pixel_decoder.encoder_layers == 6


def test_cli_help_for_every_command():
  for argv in (["--help"], ["data", "--help"], ["data", "toy", "--help"], ["data", "build", "--help"],
               ["train", "--help"], ["eval", "--help"], ["predict", "--help"], ["convert", "--help"],
               ["convert", "from-hf", "--help"], ["convert", "to-torch", "--help"], ["bench", "--help"],
               ["bench", "train", "--help"], ["bench", "predict", "--help"], ["compile", "--help"],
               ["demo", "--help"], ["data", "mosaic", "--help"], ["serve", "--help"], ["report", "--help"]):
    with pytest.raises(SystemExit) as e:
      cli.main(argv)
    assert e.value.code == 0, argv


def test_bad_arguments_give_one_line_error(tmp_path):
  for argv in (["data", "toy", "--out", str(tmp_path / "t"), "--images", "0"],
               ["train", "--config", str(tmp_path / "missing.py"), "--workdir", str(tmp_path)]):
    r = subprocess.run([sys.executable, "-m", "segearth_jax", *argv], capture_output=True, text=True)
    assert r.returncode == 2, (argv, r.stderr)
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") <= 1, r.stderr


def test_a_command_prints_no_platform_probe_noise(tmp_path):
  """A new user's first command on a CPU host: no libtpu initialisation trace (libtpu comes with the test
  extra), no transformers advice about PyTorch; only what the command says."""
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
  code = ("import segearth_jax, jax; jax.devices(); from segearth_jax.data.tokenizer import load_tokenizer; "
          "import transformers")
  r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  for noise in ("libtpu", "TPU_", "InitGoogle", "PyTorch was not found"):
    assert noise not in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize("command", [["convert", "to-torch", "--workdir", "W", "--out", "O"],
                                     ["data", "grid", "--data", "D", "--out", "g.png"]])
def test_override_on_a_command_without_config_is_refused(command, capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(command + ["--config.infer.max_new_tokens=3"])
  assert e.value.code == 2 and "takes no --config overrides" in capsys.readouterr().err
