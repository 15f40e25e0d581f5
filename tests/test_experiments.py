"""The benchmark recipes train and score on their own splits (native-format fixtures, tiny model), and every
ablation variant of `experiments/laserss_mipha3b.py:ARG` loads with the value it names."""
import json
import os

import numpy as np
import pytest

from segearth_jax.config import ConfigError, apply_overrides, load_config, parse_arg
from segearth_jax.data.pipeline import make_dataset
from segearth_jax.data.tokenizer import load_tokenizer
from segearth_jax.evaluate import evaluate_workdir
from segearth_jax.train import train
from tests import native_fixtures as nf
from tfds_laserss.build import build
from train_fixtures import REPO, tiny_config

EXPERIMENTS = os.path.join(REPO, "experiments")
# recipe -> (builder, the split it is scored on here: each fixture's val/test split with records)
RECIPES = {"rrsisd": ("rrsisd", "test"), "refsegrs": ("refsegrs", "val"), "earthreason": ("earthreason", "val")}
WRITERS = {"rrsisd": nf.write_rrsisd, "refsegrs": nf.write_refsegrs,
           "earthreason": lambda root: nf.write_earthreason(root, orphan_label=False)}


@pytest.fixture(scope="module")
def native_data(tmp_path_factory):
  """The three benchmarks' native fixtures built into one TFDS data dir: (data_dir, expected records)."""
  root = tmp_path_factory.mktemp("native")
  expected = {}
  for name, write in WRITERS.items():
    expected[name] = write(str(root / "src" / name))
    build(name, str(root / "src" / name), str(root / "tfds"))
  return str(root / "tfds"), expected


def _tiny(recipe: str, data_dir: str, tokenizer: str):
  """The recipe with the tiny model and batch of tests/train_fixtures.py (same shapes for every recipe)."""
  c = load_config(os.path.join(EXPERIMENTS, f"{recipe}.py"))
  tiny = tiny_config()
  c.model, c.mesh, c.train.trainable, c.train.lr_scale = tiny.model, tiny.mesh, tiny.train.trainable, tiny.train.lr_scale
  apply_overrides(c, [f"--config.data.data_dir={data_dir}", f"--config.data.tokenizer={tokenizer}",
                      "--config.data.text_buckets=(128,)", "--config.data.max_len=128",
                      "--config.loss.num_points=256", "--config.train.batch_size=8", "--config.train.steps=2",
                      "--config.train.warmup_ratio=0.0", "--config.train.log_every=1",
                      "--config.infer.max_new_tokens=8"])
  return c


def _batch(config, split, tok, train):
  ds = make_dataset(config, split, tokenizer=tok, train=train, process_index=0, process_count=1)
  return next(iter(ds))


def test_recipes_train_and_score_their_benchmark(native_data, toy_dataset, tmp_path):
  """Each recipe trains 2 steps on its own train split and is scored on its own eval split. The three
  build batches of the same shapes, so the session's compilation cache serves the second and third."""
  data_dir, expected = native_data
  tok = load_tokenizer(toy_dataset["tokenizer"])
  shapes = {}
  for recipe, (builder, split) in RECIPES.items():
    c = _tiny(recipe, data_dir, toy_dataset["tokenizer"])
    assert c.data.name == builder and c.train.init_from == "" and c.train.lr == 5e-5
    train_b, eval_b = _batch(c, "train", tok, True), _batch(c, split, tok, False)
    assert set(train_b["example_id"]) <= set(expected[builder]["train"])
    real = [i for i, v in zip(eval_b["example_id"], eval_b["sample_valid"]) if v]
    assert sorted(real) == sorted(expected[builder][split])
    shapes[recipe] = {(part, k): np.shape(v) for part, b in (("train", train_b), ("eval", eval_b))
                      for k, v in b.items()}
  assert shapes["refsegrs"] == shapes["earthreason"] == shapes["rrsisd"]
  for recipe, (builder, split) in RECIPES.items():
    c = _tiny(recipe, data_dir, toy_dataset["tokenizer"])
    wd = str(tmp_path / recipe)
    summary = train(c, wd)
    assert summary["steps"] == 2 and len(summary["history"]) == 2, recipe
    assert all(np.isfinite(r["loss"]) for r in summary["history"]), recipe
    result = evaluate_workdir(c, wd, split, random_init_baseline=False)
    want_units = sum(len(e["masks"]) for e in expected[builder][split].values())
    assert result["split"] == split and result["overall"]["units"] == want_units, recipe
    if builder in ("rrsisd", "refsegrs"):
      assert "Referring Segmentation" in result["protocol"]["prompt"]["train_template"]
    with open(os.path.join(wd, "eval", f"{split}.json")) as f:
      assert json.load(f)["overall"] == result["overall"]


def test_benchmark_prompts():
  rrsisd, refsegrs, er, laserss = (load_config(os.path.join(EXPERIMENTS, f"{n}.py"))
                                   for n in ("rrsisd", "refsegrs", "earthreason", "laserss_mipha3b"))
  for c in (rrsisd, refsegrs):   # referring: the referring train text, our eval prefix (declarative branch)
    assert "Referring Segmentation according to" in c.data.train_template
    assert "Reasoning" not in c.data.train_template and c.data.eval_template == "phi_chat_eval"
  assert (er.data.train_template, er.data.eval_template) == ("phi_chat", "phi_chat_eval")
  for c in (rrsisd, refsegrs, er):   # the LaSeRS recipe's model, loss and optimizer
    assert c.model.to_dict() == laserss.model.to_dict() and c.loss.to_dict() == laserss.loss.to_dict()
    assert (c.train.lr, c.train.batch_size, c.train.warmup_ratio) == (5e-5, 16, 0.03)


@pytest.mark.parametrize("recipe", ["laserss_mipha3b", "rrsisd", "refsegrs", "earthreason"])
def test_ablation_variants(recipe):
  path = os.path.join(EXPERIMENTS, f"{recipe}.py")
  base = load_config(path)
  assert (base.loss.lambda_s, base.loss.ls_form, base.model.lora.rank, base.model.lora.alpha) == \
      (0.01, "baseline", 8, 16.0)
  assert load_config(f"{path}:lambda_s=0.05").loss.lambda_s == 0.05
  assert load_config(f"{path}:ls_form=paper").loss.ls_form == "paper"
  assert load_config(f"{path}:ls_form=baseline").loss.ls_form == "baseline"
  r16 = load_config(f"{path}:lora_rank=16").model.lora
  assert (r16.rank, r16.alpha) == (16, 32.0)
  assert load_config(f"{path}:no_ls").loss.lambda_s == 0.0
  both = load_config(f"{path}:ls_form=paper,lora_rank=16,ls_target=touches,ls_divisor=kept")
  assert (both.loss.ls_form, both.model.lora.rank, both.loss.ls_target, both.loss.ls_divisor) == \
      ("paper", 16, "touches", "kept")
  assert both.data.name == base.data.name and both.train.steps == base.train.steps
  # the variant is applied before --config overrides, which still win
  assert load_config(f"{path}:lambda_s=0.05", ["--config.loss.lambda_s=0.2"]).loss.lambda_s == 0.2


@pytest.mark.parametrize("arg, why", [("nosuch=1", "unknown key"), ("ls_form=other", "one of"),
                                      ("lora_rank=abc", "takes a int value"), ("no_ls,lambda_s=0.05", "contradict"),
                                      ("lambda_s", "needs a value"), ("lambda_s=0.1,lambda_s=0.2", "twice")])
def test_bad_variants_are_clear_errors(arg, why):
  with pytest.raises(ConfigError, match=why):
    load_config(os.path.join(EXPERIMENTS, f"laserss_mipha3b.py:{arg}"))


def test_parse_arg_types():
  v = parse_arg(" a=3 , flag ,x=0.5,s=hi,off=false", a=1, flag=False, x=0.1, s="", off=True)
  assert (v.a, v.flag, v.x, v.s, v.off) == (3, True, 0.5, "hi", False)
  assert isinstance(v.x, float) and isinstance(v.a, int)
  assert parse_arg(None, a=1).a == 1 and parse_arg("", a=1).a == 1
