"""The authors' SegEarth-R2 checkpoint naming -> our params: a tiny random model's tensors are built with
transformers classes (HF/Mipha naming; their FPN: conv biases + lateral ReLU, convert_fixtures.add_authors_fpn),
renamed here to the authors' naming (the fixture: merged and PEFT-wrapped layouts), and imported through
authors_map; the params must equal the ones imported from the HF twin (import_mipha + PEFT adapter,
import_mask2former + the FPN biases, the [SEG] projector) bit for bit.

End to end (test_from_authors_cli_predict_and_to_torch): a tiny checkpoint as their code writes it (their
key names, embed_tokens with len(tokenizer) rows under a larger bias-free lm_head, trained FPN biases, LoRA
merged by PEFT) goes through `segearth convert from-authors` with no flags; Predictor then gives the masks
of the test's own PyTorch forward of the same modules, and `to-torch` writes every used tensor back bit for
bit. Shapes (test_from_authors_takes_the_checkpoint_sizes): a checkpoint whose sizes differ from the experiment
file's converts with no flags and W/config.json holds the checkpoint's; an override flag still wins."""
import json
import os
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from convert_fixtures import hf_decoder_to_d2, hf_parts, mipha_state, same_arrays, state
from train_fixtures import REPO, TINY_OVERRIDES, tiny_config

from segearth_jax import cli, tensor_io
from segearth_jax.config import load_config
from segearth_jax.convert.authors_map import authors_to_ours, import_authors_checkpoint
from segearth_jax.convert.mask2former import import_mask2former
from segearth_jax.convert.mipha import import_mipha, mipha_config_dict
from segearth_jax.convert.torch_model import SegEarthR2Torch
from segearth_jax.data.answer import EOS_TOKEN, SEG_TOKEN
from segearth_jax.data.preprocess import Preprocessor
from segearth_jax.data.templates import PRESETS
from segearth_jax.data.tokenizer import load_tokenizer, seg_token_id
from segearth_jax.errors import UserError
from segearth_jax.models.lora import split_lora
from segearth_jax.predict import Predictor
from segearth_jax.weights import load_params, load_run_config
from segearth_jax.presets import image_tokens


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
    out[k2] = v   # adapter_{k}.0/.1 and layer_{k}.0/.1 (+ .0.bias): their Sequential names equal transformers'
  assert "adapter_1.0.bias" in out and "layer_1.0.bias" in out, "fixture: build the model with fpn='authors'"
  return out


def _predictor_to_authors(hf: dict, rng, hidden: int) -> dict:
  out = hf_decoder_to_d2(hf)   # their predictor keeps detectron2's names
  # their decoder's extra tensors, unused at inference
  r = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
  out |= {"SEG_query_embed.weight": r(2, hidden), "new_query_embed.weight": r(1, hidden),
          "SEG_proj.layers.0.weight": r(hidden, hidden), "SEG_proj.layers.0.bias": r(hidden),
          "SEG_proj.layers.1.weight": r(hidden, hidden), "SEG_proj.layers.1.bias": r(hidden)}
  return out


def _authors_state(mllm: dict, seg_proj, m2f, rng, hidden: int) -> dict:
  """Their checkpoint's keys: Mipha's MLLM keys (``mllm``, no lm_head.bias), the [SEG] projector and the
  Mask2Former's parts under their module names."""
  out = {k: x for k, x in mllm.items() if k != "lm_head.bias"}
  out |= {f"SEG_token_projector.{k}": x for k, x in state(seg_proj).items()}
  sd = state(m2f)
  part = lambda p: {k[len(p):]: x for k, x in sd.items() if k.startswith(p)}  # noqa: E731
  out |= {f"model.vision_tower_mask.{k}": x for k, x in _swin_to_authors(part("pixel_level_module.encoder.")).items()}
  out |= {f"pixel_decoder.{k}": x for k, x in _pixel_decoder_to_authors(part("pixel_level_module.decoder.")).items()}
  out |= {f"predictor.{k}": x for k, x in _predictor_to_authors(part("transformer_module."), rng, hidden).items()}
  return out


# ---------------------------------------------------------------------- the tiny model, both namings
@pytest.fixture(scope="module")
def twin(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("authors")
  config = tiny_config()
  m = config.model
  rng = np.random.default_rng(0)
  parts = hf_parts(m, fpn="authors")
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
  want = import_mipha(mllm, adapter=str(adapter))
  sd = state(m2f)
  fpn_bias = re.compile(r"pixel_level_module\.decoder\.((?:adapter|layer)_\d+)\.0\.bias")
  want["mask_head"] = import_mask2former({k: x for k, x in sd.items() if not fpn_bias.fullmatch(k)})
  for k, x in sd.items():   # the FPN biases transformers' Mask2Former has no key for
    if m_ := fpn_bias.fullmatch(k):
      want["mask_head"]["pixel_decoder"][m_[1]]["conv"]["bias"] = x
  want["seg_projector"] = {"kernel": state(seg)["weight"].T.copy(), "bias": state(seg)["bias"]}

  # authors' naming (merged layout)
  merged = _authors_state(mllm, seg, m2f, rng, m.mask_decoder.hidden_dim)
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
  got, _ = import_authors_checkpoint(str(folder), twin["config"])
  _assert_same(got, twin["want"])
  llm = got["llm"]
  assert np.all(llm["lm_head"]["bias"] == 0)
  assert np.any(llm["layers"]["self_attn"]["q_proj"]["lora"]["b"] != 0)   # the trained B, not a fresh one


def test_merged_torch_file_equals_hf_twin_without_lora(twin):
  path = str(twin["tmp"] / "merged.bin")
  torch.save({"state_dict": {k: torch.from_numpy(np.ascontiguousarray(x)) for k, x in twin["merged"].items()}}, path)
  got = authors_to_ours(path)
  want, _ = split_lora(twin["want"])
  _assert_same(got, want)
  # merged + a LoRA config: fresh adapters whose B is zero (outputs unchanged)
  full, _ = import_authors_checkpoint(twin["merged"], twin["config"])
  q = full["llm"]["layers"]["self_attn"]["q_proj"]
  assert q["lora"]["a"].shape[-1] == twin["config"].model.lora.rank and np.all(q["lora"]["b"] == 0)
  assert np.array_equal(q["kernel"], want["llm"]["layers"]["self_attn"]["q_proj"]["kernel"])
  # a tokenizer one token longer than the rows: padded to the config's multiple, old rows untouched
  emb = want["llm"]["embed_tokens"]["embedding"]
  grown, _ = import_authors_checkpoint(twin["merged"], twin["config"], vocab_size=emb.shape[0] + 1)
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
  bad = {k: x for k, x in twin["merged"].items() if k != "pixel_decoder.layer_1.0.bias"}
  with pytest.raises(UserError, match=r"pixel_decoder\.layer_1\.0\.bias"):
    authors_to_ours(bad)
  bad = dict(twin["merged"], **{"pixel_decoder.adapter_1.0.bias": np.zeros((3,), np.float32)})
  with pytest.raises(UserError, match=r"pixel_decoder\.adapter_1\.0\.bias has shape \(3,\)"):
    authors_to_ours(bad)
  missing = {k: x for k, x in twin["merged"].items() if not k.startswith("SEG_token_projector.")}
  with pytest.raises(UserError, match="SEG_token_projector"):
    authors_to_ours(missing)


def test_embedding_rows_below_the_head_are_padded_never_the_head(twin):
  """Their embed_tokens has len(tokenizer) rows, their lm_head more (never resized): the embedding is
  padded up to the head, the head kept bit for bit; only a tokenizer longer than the head grows both."""
  merged = dict(twin["merged"])
  emb, head = merged["model.embed_tokens.weight"], merged["lm_head.weight"]
  V = head.shape[0]
  n = V - 70
  merged["model.embed_tokens.weight"] = emb[:n]
  got, _ = import_authors_checkpoint(merged, twin["config"], vocab_size=n + 1)   # their tokenizer + our <image>
  g = got["llm"]
  assert g["embed_tokens"]["embedding"].shape[0] == g["lm_head"]["kernel"].shape[1] == V
  assert np.array_equal(g["embed_tokens"]["embedding"][:n], emb[:n])
  assert np.array_equal(g["lm_head"]["kernel"], head.T) and np.all(g["lm_head"]["bias"] == 0)
  # the new rows: transformers' mean resizing (the mean row plus a 1e-9-scaled draw)
  added = g["embed_tokens"]["embedding"][n:]
  np.testing.assert_allclose(added, np.broadcast_to(emb[:n].mean(0), added.shape), atol=1e-4)
  grown = import_authors_checkpoint(merged, twin["config"], vocab_size=V + 1)[0]["llm"]
  mult = twin["config"].model.llm.pad_vocab_to_multiple_of
  rows = -(-(V + 1) // mult) * mult
  assert grown["embed_tokens"]["embedding"].shape[0] == grown["lm_head"]["kernel"].shape[1] == rows
  assert np.array_equal(grown["lm_head"]["kernel"][:, :V], head.T)
  merged["lm_head.weight"] = head[:n - 1]
  with pytest.raises(UserError, match=r"lm_head\.weight only"):
    import_authors_checkpoint(merged, twin["config"])


# ---------------------------------------------------------------------- end to end: their checkpoint
INSTRUCTION = "segment the ships near the harbour"
MAX_NEW = 6


def _their_tokenizer(out_dir):
  """Their tokenizer's shape: a byte-level BPE with EOS and [SEG] added, no <image> (their image
  placeholder is a negative index, not a token), so our load_tokenizer appends <image> as the last id."""
  bpe = Tokenizer(models.BPE())
  bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  bpe.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[EOS_TOKEN, SEG_TOKEN], show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  bpe.train_from_iterator([PRESETS["toy"], INSTRUCTION, "the ship and the road"] * 3, trainer=trainer)
  tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, unk_token=EOS_TOKEN,
                                pad_token=EOS_TOKEN, additional_special_tokens=[SEG_TOKEN])
  tok.save_pretrained(str(out_dir))
  return len(tok)


def _merge_lora(phi, rank: int, alpha: float, seed: int):
  """Their release: PEFT LoRA (random, non-zero B) on q_proj/v_proj, then merge_and_unload()."""
  from peft import LoraConfig, get_peft_model
  model = get_peft_model(phi, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0,
                                         target_modules=["q_proj", "v_proj"]))
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "lora_B" in name:
        p.copy_(0.05 * torch.randn(p.shape, generator=gen))
  return model.merge_and_unload()


def _steer(phi, n_rows: int, seg: int, last: int, seed: int):
  """Greedy decoding of the random model emits [SEG] A [SEG] A ... with A = the prompt's last token: A's
  embedding points along w, [SEG]'s along u (both large), the head maps w -> [SEG] and u -> A. Then the
  embedding is cut to their n_rows and the head made bias-free (nn.Linear(hidden, vocab, bias=False))."""
  rng = np.random.default_rng(seed)
  d = phi.config.hidden_size
  u, w = rng.normal(size=d), rng.normal(size=d)
  u -= u.mean()
  w -= w.mean()
  w -= u * (u @ w) / (u @ u)
  u, w = u / np.linalg.norm(u), w / np.linalg.norm(w)
  with torch.no_grad():
    emb = phi.model.embed_tokens.weight
    emb[seg], emb[last] = torch.tensor(50 * u), torch.tensor(50 * w)
    head = phi.lm_head.weight
    head[last], head[seg] = torch.tensor(3 * u), torch.tensor(3 * w)
    phi.model.embed_tokens = torch.nn.Embedding.from_pretrained(emb[:n_rows].clone(), freeze=False)
    new_head = torch.nn.Linear(d, head.shape[0], bias=False)
    new_head.weight.copy_(head)
    phi.lm_head = new_head


@torch.no_grad()
def _reference_masks(parts, seg_proj, ex, n_image: int, max_new: int, max_seg: int, eos: int, seg: int):
  """The test's own PyTorch forward of their model: SigLIP hidden_states[-2] -> projector spliced over the
  <image> run, greedy decoding (full recompute per step), the final hidden state of each fed [SEG] (at most
  max_seg) -> [SEG] projector -> Mask2Former (their FPN) decoding each query alone with zero query
  position; last prediction upsampled to the canvas, > 0, cropped and resized (nearest) to the image."""
  phi, m2f = parts["phi"], parts["mask2former"]
  p, s = int(ex["prompt_len"]), int(ex["image_start"])
  ids = torch.from_numpy(ex["input_ids"][:p].astype(np.int64))
  vis = parts["siglip"](pixel_values=torch.from_numpy(ex["siglip_image"])[None].permute(0, 3, 1, 2),
                        output_hidden_states=True).hidden_states[-2]
  img = parts["projector"](vis)
  assert img.shape[1] == n_image
  embed = phi.model.embed_tokens
  prefix = torch.cat([embed(ids[:s])[None], img, embed(ids[s + n_image:])[None]], 1)
  tokens = []
  for _ in range(max_new):
    seq = torch.cat([prefix, embed(torch.tensor(tokens, dtype=torch.long))[None]], 1)
    h = phi.model(inputs_embeds=seq).last_hidden_state
    tok = int(torch.argmax(phi.lm_head(h[0, -1])))
    tokens.append(tok)
    if tok == eos:
      break
  fed = [t for t in tokens if t != eos]
  h = phi.model(inputs_embeds=torch.cat([prefix, embed(torch.tensor(fed, dtype=torch.long))[None]], 1))
  h = h.last_hidden_state[0, p:]
  seg_hidden = h[[i for i, t in enumerate(fed) if t == seg][:max_seg]]
  queries = seg_proj(seg_hidden)
  k = queries.shape[0]
  plm = m2f.pixel_level_module(torch.from_numpy(ex["swin_image"])[None].permute(0, 3, 1, 2))
  tm = m2f.transformer_module
  src, pos, sizes = [], [], []
  for i in range(tm.num_feature_levels):
    f = plm.decoder_hidden_states[i].expand(k, -1, -1, -1)
    sizes.append(f.shape[-2:])
    pos.append(tm.position_embedder(f.shape, f.device, f.dtype, None).flatten(2).permute(2, 0, 1))
    src.append((tm.input_projections[i](f).flatten(2) + tm.level_embed.weight[i][None, :, None]).permute(2, 0, 1))
  out = tm.decoder(inputs_embeds=queries[None], multi_stage_positional_embeddings=pos,
                   pixel_embeddings=plm.decoder_last_hidden_state.expand(k, -1, -1, -1), encoder_hidden_states=src,
                   query_position_embeddings=torch.zeros_like(queries[None]), feature_size_list=sizes,
                   return_dict=True)
  logits = out.masks_queries_logits[-1][:, 0]
  M = ex["swin_image"].shape[0]
  up = F.interpolate(logits[None], size=(M, M), mode="bilinear", align_corners=False)[0] > 0
  h_img, w_img, rh, rw = (int(v) for v in ex["letterbox"])
  masks = [np.asarray(Image.fromarray(m[:rh, :rw].astype(np.uint8) * 255).resize((w_img, h_img), Image.NEAREST)) > 127
           for m in up.numpy()]
  return tokens, masks


def test_from_authors_cli_predict_and_to_torch(tmp_path):
  n_rows = _their_tokenizer(tmp_path / "their_tok")
  overrides = TINY_OVERRIDES + [f"--config.infer.max_new_tokens={MAX_NEW}", "--config.data.text_buckets=(128,)"]
  exp = tmp_path / "experiment.py"   # an experiment file: the CLI call below passes no --config.* flag
  exp.write_text("from segearth_jax.config import load_config\n\n\ndef get_config(arg=None):\n"
                 f"  return load_config({os.path.join(REPO, 'experiments', 'toy.py')!r}, {overrides!r})\n")
  config = load_config(str(exp))
  m = config.model
  tok = load_tokenizer(str(tmp_path / "their_tok"))
  assert len(tok) == n_rows + 1 < m.llm.vocab_size          # our <image> appended; their head is larger
  seg, eos = seg_token_id(tok), tok.eos_token_id
  rng = np.random.default_rng(1)
  image = rng.integers(0, 255, size=(40, 56, 3), dtype=np.uint8)   # not square: letterbox in and out
  ex = Preprocessor(config, tok, train=False, source_name="test")(
      dict(id="x", image=image, masks=[], answer="", instruction=INSTRUCTION))
  last = int(ex["input_ids"][int(ex["prompt_len"]) - 1])

  parts = hf_parts(m, seed=2, fpn="authors")
  parts["phi"] = _merge_lora(parts["phi"], int(m.lora.rank), float(m.lora.alpha), seed=3)
  _steer(parts["phi"], n_rows, seg, last, seed=4)
  seg_proj = torch.nn.Linear(m.llm.hidden_size, m.mask_decoder.hidden_dim)
  for mod in (*parts.values(), seg_proj):
    mod.eval()
  phi = state(parts["phi"])
  assert phi["model.embed_tokens.weight"].shape[0] == n_rows and "lm_head.bias" not in phi
  assert not any("lora" in k for k in phi)
  sd = state(parts["mask2former"])
  assert np.abs(sd["pixel_level_module.decoder.adapter_1.0.bias"]).min() > 0
  ckpt = _authors_state(mipha_state(parts), seg_proj, parts["mask2former"], rng, m.mask_decoder.hidden_dim)
  src = tmp_path / "their_release"
  os.makedirs(src)
  save_file(ckpt, str(src / "model.safetensors"))

  W = str(tmp_path / "weights")
  assert cli.main(["convert", "from-authors", "--config", str(exp), "--checkpoint", str(src),
                   "--tokenizer", str(tmp_path / "their_tok"), "--out", W]) == 0

  pred = Predictor.load(W)
  assert pred.config.model.pixel_decoder.fpn == "authors" and pred.config.model.llm.vocab_size == m.llm.vocab_size
  ours = pred(image, INSTRUCTION)
  tokens, masks = _reference_masks(parts, seg_proj, ex, image_tokens(m), MAX_NEW, int(m.max_seg), eos, seg)
  assert ours["tokens"] == tokens
  assert tokens[:4] == [seg, last, seg, last]                       # the mask path runs, twice
  assert len(ours["masks"]) == len(masks) == m.max_seg
  for a, b in zip(ours["masks"], masks):
    assert a.shape == b.shape == image.shape[:2] and 0 < b.sum() < b.size
    assert np.logical_and(a, b).sum() / np.logical_or(a, b).sum() >= 0.99

  out = str(tmp_path / "torch")
  assert cli.main(["convert", "to-torch", "--workdir", W, "--out", out]) == 0
  with safe_open(os.path.join(out, "model.safetensors"), "np") as h:
    got = {k: h.get_tensor(k) for k in h.keys()}
  want = {f"vision_tower.{k}": x for k, x in state(parts["siglip"]).items()
          if not k.endswith("position_ids") and not k.startswith("head.")}
  want |= {f"projector.{k}": x for k, x in state(parts["projector"]).items()}
  want |= {f"llm.{k}": x for k, x in phi.items()}
  want |= {f"seg_projector.{k}": x for k, x in state(seg_proj).items()}
  new = ("queries_features", "queries_embedder", "relative_position_index", "swin.layernorm.")
  want |= {f"mask_head.{k}": x for k, x in sd.items() if not any(s_ in k for s_ in new)}
  emb = "llm.model.embed_tokens.weight"
  assert got[emb].shape[0] == m.llm.vocab_size and np.array_equal(got[emb][:n_rows], want.pop(emb))
  same_arrays({k: got[k] for k in want}, want)
  assert np.all(got["llm.lm_head.bias"] == 0)
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f)["pixel_decoder_fpn"] == "authors"
  # the exported PyTorch model computes their FPN too (a strict load: its FPN convs have the biases)
  exported = SegEarthR2Torch.from_pretrained(out)
  assert isinstance(exported.mask_head.pixel_level_module.decoder.adapter_1[-1], torch.nn.ReLU)
  theirs = exported.segment(image, INSTRUCTION)
  assert theirs["tokens"] == tokens
  for a, b in zip(theirs["masks"], masks, strict=True):
    assert np.logical_and(a, b).sum() / np.logical_or(a, b).sum() >= 0.99


# ---------------------------------------------------------------------- shapes: the checkpoint's, not the file's
def test_from_authors_takes_the_checkpoint_sizes(tmp_path):
  """Their checkpoint's Phi / SigLIP / Swin sizes differ from the experiment file's: with no --config.model
  flag W/config.json holds the checkpoint's (Phi from their config.json, which lacks the vision sizes: those
  and the mask head's from the tensors) and W loads; an override flag still wins over config.json."""
  exp_overrides = TINY_OVERRIDES + ["--config.model.lora.rank=0"]
  exp = tmp_path / "experiment.py"
  exp.write_text("from segearth_jax.config import load_config\n\n\ndef get_config(arg=None):\n"
                 f"  return load_config({os.path.join(REPO, 'experiments', 'toy.py')!r}, {exp_overrides!r})\n")
  base = load_config(str(exp)).model
  theirs = tiny_config("--config.model.lora.rank=0", "--config.model.llm.hidden_size=96",
                       "--config.model.llm.num_hidden_layers=3", "--config.model.llm.intermediate_size=160",
                       "--config.model.llm.layer_norm_eps=1e-6", "--config.model.vision.intermediate_size=96",
                       "--config.model.vision.layer_norm_eps=1e-5",
                       "--config.model.swin.depths=(1,1,2,1)").model
  assert (theirs.llm.hidden_size, theirs.llm.num_hidden_layers, theirs.vision.intermediate_size,
          tuple(theirs.swin.depths)) != (base.llm.hidden_size, base.llm.num_hidden_layers,
                                         base.vision.intermediate_size, tuple(base.swin.depths))
  parts = hf_parts(theirs, seed=5, fpn="authors")
  seg_proj = torch.nn.Linear(theirs.llm.hidden_size, theirs.mask_decoder.hidden_dim)
  src = tmp_path / "their_release"
  os.makedirs(src)
  save_file(_authors_state(mipha_state(parts), seg_proj, parts["mask2former"], np.random.default_rng(6),
                           theirs.mask_decoder.hidden_dim), str(src / "model.safetensors"))
  their_json = mipha_config_dict(theirs)
  (src / "config.json").write_text(json.dumps({k: v for k, v in their_json.items() if k != "vision_config"}))
  _their_tokenizer(tmp_path / "their_tok")

  def convert(out, *flags):
    assert cli.main(["convert", "from-authors", "--config", str(exp), "--checkpoint", str(src),
                     "--tokenizer", str(tmp_path / "their_tok"), "--out", out, *flags]) == 0
    return load_run_config(out).model

  W = str(tmp_path / "W")
  got = convert(W)
  assert got.llm.hidden_size == 96 and got.llm.num_hidden_layers == 3 and got.llm.intermediate_size == 160
  assert got.llm.layer_norm_eps == 1e-6                       # from their config.json: no tensor shows it
  assert got.vision.intermediate_size == 96 and got.vision.image_size == theirs.vision.image_size
  assert tuple(got.swin.depths) == (1, 1, 2, 1) and got.pixel_decoder.fpn == "authors"
  params = load_params(W)
  q = params["llm"]["layers"]["self_attn"]["q_proj"]["kernel"]
  assert np.shape(q) == (3, 96, 96) and np.shape(params["seg_projector"]["kernel"])[0] == 96
  got = convert(str(tmp_path / "W2"), "--config.model.llm.layer_norm_eps=1e-3")
  assert got.llm.layer_norm_eps == 1e-3 and got.llm.hidden_size == 96
  assert got.vision.layer_norm_eps == base.vision.layer_norm_eps != 1e-5   # no tensor shows it
  (src / "config.json").write_text(json.dumps(their_json))   # with their vision_config: its fields are used
  got = convert(str(tmp_path / "W3"))
  assert got.vision.layer_norm_eps == 1e-5 and got.vision.intermediate_size == 96 and got.llm.hidden_size == 96
