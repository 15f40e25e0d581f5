"""The authors' SegEarth-R2 checkpoint naming -> our params: a tiny random model's tensors are built with
transformers classes (HF/Mipha naming), renamed here to the authors' naming (the fixture: merged and
PEFT-wrapped layouts), and imported through authors_map; the params must equal the ones imported from the
HF twin (import_mipha + PEFT adapter, import_mask2former, the [SEG] projector) bit for bit."""
import json
import os
import re

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from convert_fixtures import hf_decoder_to_d2, hf_parts, mipha_state, same_arrays, state
from train_fixtures import tiny_config

from segearth_jax import tensor_io
from segearth_jax.convert.authors_map import authors_to_ours, import_authors_checkpoint
from segearth_jax.convert.mask2former import import_mask2former
from segearth_jax.convert.mipha import import_mipha
from segearth_jax.errors import UserError


# ---------------------------------------------------------------------- HF -> authors' names (fixture)
def _swin_to_authors(hf: dict) -> dict:
  """transformers SwinBackbone state_dict (module layout) -> the original Swin names their code uses."""
  out, qkv = {}, {}
  for k, v in hf.items():
    if k.startswith("swin.layernorm."):
      continue  # their backbone has no final norm
    if m := re.fullmatch(r"swin\.embeddings\.patch_embeddings\.projection\.(weight|bias)", k):
      out[f"patch_embed.proj.{m[1]}"] = v
    elif m := re.fullmatch(r"swin\.embeddings\.norm\.(weight|bias)", k):
      out[f"patch_embed.norm.{m[1]}"] = v
    elif m := re.fullmatch(r"swin\.encoder\.layers\.(\d+)\.blocks\.(\d+)\.(.+)", k):
      s, j, rest = m.groups()
      b = f"layers.{s}.blocks.{j}."
      if mm := re.fullmatch(r"attention\.([qkv])_proj\.(weight|bias)", rest):
        qkv.setdefault(f"{b}attn.qkv.{mm[2]}", {})[mm[1]] = v
        continue
      ren = {"attention.o_proj.weight": "attn.proj.weight", "attention.o_proj.bias": "attn.proj.bias",
             "attention.relative_position_bias.relative_position_bias_table": "attn.relative_position_bias_table",
             "layernorm_before.weight": "norm1.weight", "layernorm_before.bias": "norm1.bias",
             "layernorm_after.weight": "norm2.weight", "layernorm_after.bias": "norm2.bias"}
      out[b + ren.get(rest, rest)] = v   # mlp.fc1 / mlp.fc2 keep their names
      if rest.startswith("layernorm_before.weight"):   # a persistent buffer in their WindowAttention
        out[b + "attn.relative_position_index"] = np.zeros((4, 4), np.int64)
    elif m := re.fullmatch(r"swin\.encoder\.layers\.(\d+)\.downsample\.(.+)", k):
      out[f"layers.{m[1]}.downsample.{m[2]}"] = v
    elif m := re.fullmatch(r"hidden_states_norms\.stage(\d+)\.(weight|bias)", k):
      out[f"norm{int(m[1]) - 1}.{m[2]}"] = v
    else:
      raise AssertionError(f"fixture: unexpected swin key {k}")
  for k, parts in qkv.items():
    out[k] = np.concatenate([parts["q"], parts["k"], parts["v"]], 0)
  return out


def _pixel_decoder_to_authors(hf: dict) -> dict:
  out = {}
  for k, v in hf.items():
    k2 = re.sub(r"^input_projections\.", "input_proj.", k)
    k2 = re.sub(r"^level_embed$", "transformer.level_embed", k2)
    if m := re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", k2):
      rest = {"self_attn_layer_norm": "norm1", "fc1": "linear1", "fc2": "linear2",
              "final_layer_norm": "norm2"}
      head, _, tail = m[2].partition(".")
      k2 = f"transformer.encoder.layers.{m[1]}.{rest.get(head, head)}.{tail}"
    k2 = re.sub(r"^mask_projection\.", "mask_features.", k2)
    out[k2] = v   # adapter_{k}.0/.1 and layer_{k}.0/.1: their Sequential names equal transformers'
  for name in ("adapter_1", "layer_1"):   # their FPN Conv2d has a bias, zero as loaded from detectron2
    out[f"{name}.0.bias"] = np.zeros_like(out[f"{name}.1.bias"])
  return out


def _predictor_to_authors(hf: dict, rng, hidden: int) -> dict:
  out = hf_decoder_to_d2(hf)   # their predictor keeps detectron2's names
  # their decoder's extra tensors, unused at inference
  r = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
  out |= {"SEG_query_embed.weight": r(2, hidden), "new_query_embed.weight": r(1, hidden),
          "SEG_proj.layers.0.weight": r(hidden, hidden), "SEG_proj.layers.0.bias": r(hidden),
          "SEG_proj.layers.1.weight": r(hidden, hidden), "SEG_proj.layers.1.bias": r(hidden)}
  return out


# ---------------------------------------------------------------------- the tiny model, both namings
@pytest.fixture(scope="module")
def twin(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("authors")
  config = tiny_config()
  m = config.model
  rng = np.random.default_rng(0)
  parts = hf_parts(m)
  phi, m2f = parts["phi"], parts["mask2former"]
  seg = torch.nn.Linear(m.llm.hidden_size, m.mask_decoder.hidden_dim)
  with torch.no_grad():  # no lm_head bias (theirs has none)
    phi.lm_head.bias.zero_()
  mllm = mipha_state(parts)

  # HF twin: Mipha naming + a PEFT adapter folder + a Mask2FormerModel folder
  L, D, r = m.llm.num_hidden_layers, m.llm.hidden_size, m.lora.rank
  lora = {}
  for i in range(L):
    for t in ("q_proj", "v_proj"):
      lora[f"model.layers.{i}.self_attn.{t}.lora_A.weight"] = rng.standard_normal((r, D)).astype(np.float32)
      lora[f"model.layers.{i}.self_attn.{t}.lora_B.weight"] = rng.standard_normal((D, r)).astype(np.float32)
  adapter = tmp / "adapter"
  os.makedirs(adapter)
  save_file({"base_model.model." + k: x for k, x in lora.items()}, str(adapter / "adapter_model.safetensors"))
  with open(adapter / "adapter_config.json", "w") as f:
    json.dump({"target_modules": ["q_proj", "v_proj"], "r": r, "lora_alpha": 16}, f)
  m2f.save_pretrained(str(tmp / "m2f"))
  want = import_mipha(mllm, adapter=str(adapter))
  want["mask_head"] = import_mask2former(str(tmp / "m2f"))
  want["seg_projector"] = {"kernel": state(seg)["weight"].T.copy(), "bias": state(seg)["bias"]}

  # authors' naming (merged layout)
  merged = {k: x for k, x in mllm.items() if k != "lm_head.bias"}
  merged |= {f"SEG_token_projector.{k}": x for k, x in state(seg).items()}
  sd = state(m2f)
  part = lambda p: {k[len(p):]: x for k, x in sd.items() if k.startswith(p)}  # noqa: E731
  merged |= {f"model.vision_tower_mask.{k}": x for k, x in _swin_to_authors(part("pixel_level_module.encoder.")).items()}
  merged |= {f"pixel_decoder.{k}": x
             for k, x in _pixel_decoder_to_authors(part("pixel_level_module.decoder.")).items()}
  merged |= {f"predictor.{k}": x
             for k, x in _predictor_to_authors(part("transformer_module."), rng, m.mask_decoder.hidden_dim).items()}
  merged["model.rotary_emb.inv_freq"] = np.ones((4,), np.float32)

  # PEFT-wrapped layout (a PeftModel state dict: LoRA kept apart)
  peft = {}
  for k, x in merged.items():
    k = re.sub(r"(self_attn\.[qv]_proj)\.(weight|bias)$", r"\1.base_layer.\2", k)
    peft["base_model.model." + k] = x
  for k, x in lora.items():
    peft["base_model.model." + k.replace(".weight", ".default.weight")] = x
  return dict(config=config, want=want, merged=merged, peft=peft, tmp=tmp)


def _assert_same(got, want):
  same_arrays(tensor_io.flatten(got), tensor_io.flatten(want))


def test_peft_wrapped_safetensors_folder_equals_hf_twin(twin):
  folder = twin["tmp"] / "peft_ckpt"
  tensor_io.save_safetensors(twin["peft"].items(), str(folder), max_shard_bytes=1 << 20)   # sharded + index
  assert os.path.isfile(folder / "model.safetensors.index.json")
  got = import_authors_checkpoint(str(folder), twin["config"])
  _assert_same(got, twin["want"])
  llm = got["llm"]
  assert np.all(llm["lm_head"]["bias"] == 0)
  assert np.any(llm["layers"]["self_attn"]["q_proj"]["lora"]["b"] != 0)   # the trained B, not a fresh one


def test_merged_torch_file_equals_hf_twin_without_lora(twin):
  path = str(twin["tmp"] / "merged.bin")
  torch.save({"state_dict": {k: torch.from_numpy(np.ascontiguousarray(x)) for k, x in twin["merged"].items()}}, path)
  got = authors_to_ours(path)
  from segearth_jax.models.lora import split_lora
  want, _ = split_lora(twin["want"])
  _assert_same(got, want)
  # merged + a LoRA config: fresh adapters whose B is zero (outputs unchanged)
  full = import_authors_checkpoint(twin["merged"], twin["config"])
  q = full["llm"]["layers"]["self_attn"]["q_proj"]
  assert q["lora"]["a"].shape[-1] == twin["config"].model.lora.rank and np.all(q["lora"]["b"] == 0)
  assert np.array_equal(q["kernel"], want["llm"]["layers"]["self_attn"]["q_proj"]["kernel"])
  # a tokenizer one token longer than the rows: padded to the config's multiple, old rows untouched
  emb = want["llm"]["embed_tokens"]["embedding"]
  grown = import_authors_checkpoint(twin["merged"], twin["config"], vocab_size=emb.shape[0] + 1)
  mult = twin["config"].model.llm.pad_vocab_to_multiple_of
  g = grown["llm"]
  assert g["embed_tokens"]["embedding"].shape[0] == -(-(emb.shape[0] + 1) // mult) * mult
  assert np.array_equal(g["embed_tokens"]["embedding"][:emb.shape[0]], emb)
  assert g["lm_head"]["kernel"].shape[1] == g["embed_tokens"]["embedding"].shape[0]


def test_unknown_and_unrepresentable_keys_are_named(twin):
  bad = dict(twin["merged"], **{"model.some_new_head.weight": np.ones((2, 2), np.float32)})
  with pytest.raises(UserError, match=r"model\.some_new_head\.weight"):
    authors_to_ours(bad)
  bad = dict(twin["merged"], **{"predictor.class_gate.weight": np.ones((2, 2), np.float32)})
  with pytest.raises(UserError, match=r"predictor\.class_gate\.weight"):
    authors_to_ours(bad)
  bad = dict(twin["merged"])
  bad["pixel_decoder.adapter_1.0.bias"] = bad["pixel_decoder.adapter_1.0.bias"] + 0.5
  with pytest.raises(UserError, match=r"pixel_decoder\.adapter_1\.0\.bias"):
    authors_to_ours(bad)
  got = authors_to_ours(bad, drop_fpn_bias=True)   # explicit opt-in drops it
  assert "bias" not in got["mask_head"]["pixel_decoder"]["adapter_1"]["conv"]
  missing = {k: x for k, x in twin["merged"].items() if not k.startswith("SEG_token_projector.")}
  with pytest.raises(UserError, match="SEG_token_projector"):
    authors_to_ours(missing)
