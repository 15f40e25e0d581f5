"""Tokenizer handling: [SEG]/<image> are single ids for the toy BPE and for a Phi-2-like (CodeGen) folder."""
import json

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import CodeGenTokenizer

from segearth_jax.data import tokenizer as tk
from segearth_jax.data.answer import EOS_TOKEN
from segearth_jax.errors import UserError

ANSWER = "<p>storage tank</p>[SEG] and <p>ship</p>[SEG]"
TEXTS = ["the storage tanks near the harbour", "<p>ship</p>[SEG] on the water", ANSWER,
         "where could a helicopter land?", "This is an image \n<image>\n, segment it"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
  out = tmp_path_factory.mktemp("toy_tok")
  return out, tk.train_toy_tokenizer(TEXTS, out, vocab_size=300)


def test_toy_special_tokens_are_single_ids(toy):
  _, tok = toy
  assert len(tok) <= 300
  seg, img = tk.seg_token_id(tok), tk.image_token_id(tok)
  assert seg != img
  ids = tok.encode(ANSWER, add_special_tokens=False)
  assert ids.count(seg) == 2
  assert tok.decode(ids) == ANSWER
  ids = tok.encode("look at \n<image>\n now[SEG]x", add_special_tokens=False)
  assert ids.count(img) == 1 and ids.count(seg) == 1
  assert tok.pad_token == tok.eos_token == EOS_TOKEN


def test_toy_saved_folder_loads_same_ids(toy, tmp_path):
  out, tok = toy
  again = tk.load_tokenizer(out)
  for text in TEXTS + ["unseen words: airplane engines"]:
    assert again.encode(text) == tok.encode(text)
  # Training again on the same texts (other order, duplicates) writes identical files.
  tk.train_toy_tokenizer(list(reversed(TEXTS)) + TEXTS[:2], tmp_path, vocab_size=300)
  for name in ("tokenizer.json", "tokenizer_config.json"):
    assert (tmp_path / name).read_bytes() == (out / name).read_bytes()


def _phi2_like_folder(path):
  """A tiny CodeGen BPE folder without [SEG] or <image>, saved the way Phi-2's is."""
  bpe = Tokenizer(models.BPE())
  bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  bpe.train_from_iterator(TEXTS, trainer=trainer)
  merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
            for m in json.loads(bpe.to_str())["model"]["merges"]]
  tok = CodeGenTokenizer(vocab=bpe.get_vocab(), merges=merges)
  tok.save_pretrained(path)
  return tok


def test_phi2_like_folder_gets_seg_added(tmp_path):
  raw = _phi2_like_folder(tmp_path)
  assert "[SEG]" not in raw.get_vocab()
  assert len(raw.encode("[SEG]", add_special_tokens=False)) > 1
  assert raw.pad_token is None
  tok = tk.load_tokenizer(tmp_path)
  assert type(tok).__name__ == "CodeGenTokenizer"
  seg, img = tk.seg_token_id(tok), tk.image_token_id(tok)
  assert seg >= len(raw) and img >= len(raw) and seg != img
  ids = tok.encode(ANSWER, add_special_tokens=False)
  assert ids.count(seg) == 2
  assert tok.decode(ids) == ANSWER
  assert tok.pad_token == "<|endoftext|>"
  # Text without the new tokens encodes as before.
  assert tok.encode("the ship", add_special_tokens=False) == raw.encode("the ship", add_special_tokens=False)


def test_missing_folder_is_a_user_error(tmp_path):
  with pytest.raises(UserError, match="nope"):
    tk.load_tokenizer(tmp_path / "nope")


def test_folder_without_tokenizer_files_is_a_one_line_error(tmp_path):
  """Not transformers' sentencepiece/tiktoken message: the folder and the files it needs."""
  (tmp_path / "config.json").write_text("{}")
  with pytest.raises(UserError) as e:
    tk.load_tokenizer(tmp_path)
  msg = str(e.value)
  assert "\n" not in msg and str(tmp_path) in msg and "sentencepiece" not in msg, msg
  for name in ("tokenizer.json", "vocab.json + merges.txt", "tokenizer_config.json"):
    assert name in msg, msg


def test_unreadable_tokenizer_file_is_a_one_line_error(toy, tmp_path):
  out, _ = toy
  for name in ("tokenizer.json", "tokenizer_config.json"):
    (tmp_path / name).write_bytes((out / name).read_bytes())
  (tmp_path / "tokenizer.json").write_text("{not json")
  with pytest.raises(UserError) as e:
    tk.load_tokenizer(tmp_path)
  msg = str(e.value)
  assert "\n" not in msg and str(tmp_path) in msg and "tokenizer.json" in msg, msg
