"""from-hf on tiny random HF checkpoints (Mipha-style folder + Mask2FormerModel), then to-torch: every tensor
that was not newly made (LoRA, [SEG] projector, unused learned queries) comes back bit for bit, with
model.scan_layers True and False alike; both layouts give the same exported files and the same masks."""
import os

import jax
import numpy as np
import pytest
from safetensors import safe_open

from convert_fixtures import hf_parts, same_arrays, state, write_mipha
from train_fixtures import random_batch, tiny_config

from segearth_jax.convert.checkpoint import export_torch, from_hf
from segearth_jax.models.segearth import build_model
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
