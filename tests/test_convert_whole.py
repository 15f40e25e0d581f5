"""from-hf on tiny random HF checkpoints (Mipha-style folder + Mask2FormerModel), then to-torch: every tensor
that was not newly made (LoRA, [SEG] projector, unused learned queries) comes back bit for bit, with
model.scan_layers True and False alike; both layouts give the same exported files and the same masks.
The model's sizes come from the checkpoints (their config.json, or a detectron2 .pkl's tensors), not the
experiment file; --config.model flags override them."""
import os
import pickle

import jax
import numpy as np
import pytest
from safetensors import safe_open

from convert_fixtures import hf_parts, same_arrays, state, write_mipha
from test_mask2former_convert import _hf_to_d2
from train_fixtures import random_batch, tiny_config

from segearth_jax.convert.checkpoint import export_torch, from_hf
from segearth_jax.models.segearth import build_model
from segearth_jax.predict import Predictor
from segearth_jax.tensor_io import SafetensorsReader
from segearth_jax.weights import load_params, load_run_config

NEW = ("queries_features", "queries_embedder", "relative_position_index", "swin.layernorm.")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("sources")
  config = tiny_config()
  parts = hf_parts(config.model)
  mipha = write_mipha(tmp / "mipha", parts, config.model)
  parts["mask2former"].save_pretrained(str(tmp / "m2f"))
  return dict(parts=parts, mipha=mipha, m2f=str(tmp / "m2f"))


def _convert(sources, tmp, *overrides):
  """from-hf -> W -> to-torch; (W's params, its config, the exported tensors, the adapter's tensors)."""
  W, out = str(tmp / "W"), str(tmp / "torch")
  from_hf(sources["mipha"], sources["m2f"], W, tiny_config(*overrides), seed=0)
  params, cfg_w = load_params(W), load_run_config(W)
  assert os.path.isdir(cfg_w.data.tokenizer)
  export_torch(params, cfg_w, cfg_w.data.tokenizer, out)
  with safe_open(os.path.join(out, "model.safetensors"), "np") as h:
    got = {k: h.get_tensor(k) for k in h.keys()}
  adapter = SafetensorsReader(os.path.join(out, "adapter", "adapter_model.safetensors"))
  return params, cfg_w, got, {k: adapter.get(k) for k in adapter.keys()}


@pytest.fixture(scope="module")
def scanned(sources, tmp_path_factory):
  return _convert(sources, tmp_path_factory.mktemp("scan"))


def test_from_hf_then_to_torch_is_bit_exact(sources, scanned):
  params, cfg_w, got, adapter = scanned
  m = cfg_w.model
  assert params["llm"]["layers"]["self_attn"]["q_proj"]["lora"]["a"].shape == (2, m.llm.hidden_size, m.lora.rank)
  assert len(adapter) == 4 * m.llm.num_hidden_layers    # A and B of q_proj and v_proj per layer
  parts = sources["parts"]
  want = {f"vision_tower.{k}": x for k, x in state(parts["siglip"]).items() if not k.endswith("position_ids")
          and not k.startswith("head.")}  # the pooling head is not part of LLaVA-style models
  want |= {f"projector.{k}": x for k, x in state(parts["projector"]).items()}
  want |= {f"llm.{k}": x for k, x in state(parts["phi"]).items()}
  want |= {f"mask_head.{k}": x for k, x in state(parts["mask2former"]).items() if not any(s in k for s in NEW)}
  same_arrays({k: got[k] for k in want if k in got}, want)
  new = set(got) - set(want)
  assert all(k.startswith("seg_projector.") or any(s in k for s in NEW) for k in new), new


def test_scan_layers_false_same_export_and_same_masks(sources, scanned, tmp_path):
  """Unstacked layers (layers_{i} / blocks_{j} params): the same tensors on disk after from-hf -> to-torch
  (so the same as the source), and the same model outputs as the scanned model with its imported params."""
  params, cfg_w, got, adapter = scanned
  flat_params, flat_cfg, flat_got, flat_adapter = _convert(sources, tmp_path, "--config.model.scan_layers=False")
  assert not flat_cfg.model.scan_layers and "layers_1" in flat_params["llm"] and "layers_0" in \
      flat_params["vision"]["encoder"] and "blocks_0" in flat_params["mask_head"]["swin"]["stage0"]
  same_arrays(flat_got, got)
  same_arrays(flat_adapter, adapter)

  vocab = params["llm"]["embed_tokens"]["embedding"].shape[0]
  batch = random_batch(cfg_w, 2)
  outs = []
  for cfg, p in ((cfg_w, params), (flat_cfg, flat_params)):
    model = build_model(cfg.model, vocab)
    outs.append(jax.jit(lambda prm, b, model=model: model.apply({"params": prm}, b))(p, batch))
  a, b = outs
  assert np.abs(np.asarray(a["mask_logits"])).max() > 0
  np.testing.assert_allclose(np.asarray(b["mask_logits"]), np.asarray(a["mask_logits"]), atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(b["logits"]), np.asarray(a["logits"]), atol=1e-5, rtol=0)


# ------------------------------------------------------------------ sizes from the checkpoints
# A checkpoint of other sizes than tiny_config()'s in every part (vision, Phi, Swin, pixel decoder, mask
# decoder; the Mask2Former's one head count serves both its decoders).
OTHER_SIZES = [
    "--config.model.vision.hidden_size=48", "--config.model.vision.intermediate_size=96",
    "--config.model.vision.num_hidden_layers=3", "--config.model.vision.num_attention_heads=2",
    "--config.model.vision.image_size=42", "--config.model.vision.feature_layer=-1",
    "--config.model.llm.vocab_size=960", "--config.model.llm.hidden_size=96",
    "--config.model.llm.intermediate_size=160", "--config.model.llm.num_hidden_layers=3",
    "--config.model.llm.num_attention_heads=2", "--config.model.llm.num_key_value_heads=2",
    "--config.model.swin.embed_dim=16", "--config.model.swin.depths=(1,2,1,1)",
    "--config.model.swin.num_heads=(1,2,2,4)", "--config.model.swin.window_size=2",
    "--config.model.swin.mlp_ratio=2.0",
    "--config.model.pixel_decoder.feature_size=64", "--config.model.pixel_decoder.mask_feature_size=64",
    "--config.model.pixel_decoder.encoder_layers=2", "--config.model.pixel_decoder.num_attention_heads=2",
    "--config.model.pixel_decoder.encoder_feedforward_dim=96",
    "--config.model.mask_decoder.hidden_dim=32", "--config.model.mask_decoder.num_layers=3",
    "--config.model.mask_decoder.num_attention_heads=2", "--config.model.mask_decoder.dim_feedforward=48",
]
# the fields each part's checkpoint fixes (swin.image_size, the canvas, stays the experiment's)
SHAPE_FIELDS = dict(
    vision=("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
            "feature_layer"),
    llm=("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"),
    swin=("embed_dim", "depths", "num_heads", "window_size", "mlp_ratio"),
    pixel_decoder=("feature_size", "mask_feature_size", "encoder_layers", "num_attention_heads",
                   "encoder_feedforward_dim"),
    mask_decoder=("hidden_dim", "num_layers", "num_attention_heads", "dim_feedforward"))


@pytest.fixture(scope="module")
def other_sources(tmp_path_factory):
  """Mipha folder + HF Mask2Former folder + detectron2 .pkl (no config) of OTHER_SIZES."""
  tmp = tmp_path_factory.mktemp("other")
  model = tiny_config(*OTHER_SIZES).model
  parts = hf_parts(model)
  mipha = write_mipha(tmp / "mipha", parts, model)
  parts["mask2former"].save_pretrained(str(tmp / "m2f"))
  saved = SafetensorsReader(str(tmp / "m2f" / "model.safetensors"))   # save_pretrained's key layout
  d2 = _hf_to_d2({f"model.{k}": saved.get(k) for k in saved.keys()})
  with open(tmp / "m2f.pkl", "wb") as f:
    pickle.dump({"model": d2}, f)
  return dict(model=model, parts=parts, mipha=mipha, m2f=str(tmp / "m2f"), pkl=str(tmp / "m2f.pkl"))


def _fields(model_cfg) -> dict:
  """SHAPE_FIELDS of a model config (lists, as W/config.json stores tuples, as tuples)."""
  as_tuple = lambda v: tuple(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
  return {part: {k: as_tuple(model_cfg[part][k]) for k in keys} for part, keys in SHAPE_FIELDS.items()}


def test_from_hf_takes_the_checkpoints_sizes(other_sources, tmp_path):
  """No size flags: W/config.json holds the checkpoints' sizes (none of them tiny_config()'s) and W loads."""
  want, base = _fields(other_sources["model"]), _fields(tiny_config().model)
  assert all(want[p][k] != base[p][k] for p in want for k in want[p])
  W = str(tmp_path / "W")
  from_hf(other_sources["mipha"], other_sources["m2f"], W, tiny_config())
  cfg = load_run_config(W)
  assert _fields(cfg.model) == want
  assert cfg.model.swin.image_size == tiny_config().model.swin.image_size
  params = load_params(W)
  sig = state(other_sources["parts"]["siglip"])["embeddings.patch_embedding.weight"]
  np.testing.assert_array_equal(params["vision"]["embeddings"]["patch_embedding"]["kernel"], sig.transpose(2, 3, 1, 0))
  Predictor.load(W)   # builds the model of W/config.json and checks every param's shape against it


def test_from_hf_detectron2_sizes_from_tensors_and_flags_win(other_sources, tmp_path):
  """A .pkl has no config: its sizes come from its tensors (the mask decoder's head count, which no tensor
  shows, stays the experiment's); a --config.model flag wins over the checkpoint."""
  W = str(tmp_path / "W")
  flags = ["--config.model.vision.feature_layer=-3", "--config.model.llm.vocab_size=1024"]
  from_hf(other_sources["mipha"], other_sources["pkl"], W, tiny_config(), overrides=flags)
  cfg = load_run_config(W)
  want = _fields(other_sources["model"])
  want["vision"]["feature_layer"], want["llm"]["vocab_size"] = -3, 1024
  want["mask_decoder"]["num_attention_heads"] = tiny_config().model.mask_decoder.num_attention_heads
  assert _fields(cfg.model) == want
  assert load_params(W)["llm"]["embed_tokens"]["embedding"].shape == (1024, 96)
  Predictor.load(W)
