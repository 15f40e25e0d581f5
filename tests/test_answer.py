"""The answer format (data/answer.py): target text, phrase parsing and [SEG] counting agree with each other,
with the toy generator and with the tokenizer."""
import numpy as np

from segearth_jax.data import answer
from segearth_jax.data.tokenizer import seg_token_id, train_toy_tokenizer
from segearth_jax.toy import instructions as ins
from segearth_jax.toy.scenes import SCENE_TYPES, draw_scene

PHRASES = ["the storage tank", "all the ships, left of the pier", "the engines of the largest airplane"]


def test_target_text_is_the_documented_format():
  assert answer.target_text("the ship") == "<p>the ship</p>[SEG]"
  assert answer.SEG_TOKEN == "[SEG]" and answer.IMAGE_TOKEN == "<image>" and answer.EOS_TOKEN == "<|endoftext|>"


def test_phrase_round_trip_and_seg_count():
  text = "Oil is stored in " + answer.target_text(PHRASES[0]) + ", and " + " and ".join(
      answer.target_text(p) for p in PHRASES[1:]) + "."
  assert answer.PHRASE.findall(text) == PHRASES
  assert answer.phrases_of(text, 3) == PHRASES
  assert answer.seg_count(text) == 3
  # fewer phrases asked for than written: the first ones; more: numbered placeholders
  assert answer.phrases_of(text, 2) == PHRASES[:2]
  assert answer.phrases_of(text, 5) == PHRASES + ["target 4", "target 5"]


def test_generated_answers_parse():
  # a model may put spaces between a phrase and its [SEG]; an answer may have [SEG] without a phrase
  assert answer.phrases_of("<p>the road</p> [SEG] and <p>a car</p>\n[SEG]", 2) == ["the road", "a car"]
  unnamed = "The flooded fields. [SEG]"                     # EarthReason style
  assert answer.seg_count(unnamed) == 1 and answer.phrases_of(unnamed, 1) == ["target 1"]
  assert answer.seg_count("There is no ship in this image.") == 0
  assert answer.phrases_of("There is no ship in this image.", 0) == []
  # a phrase without its [SEG] names no mask
  assert answer.PHRASE.findall("<p>the tail</p> of it, <p>the wing</p>[SEG]") == ["the wing"]


def test_toy_answers_name_every_mask():
  rng = np.random.default_rng(0)
  seen = 0
  for i, kind in enumerate(ins.KINDS):
    scene = draw_scene(SCENE_TYPES[i % len(SCENE_TYPES)], np.random.default_rng(i), 128)
    rec = ins.build_record(scene, kind, rng)
    if rec is None:
      continue
    n = len(rec["masks"])
    assert answer.seg_count(rec["answer"]) == n
    assert len(answer.PHRASE.findall(rec["answer"])) == n
    seen += n
  assert seen > 0


def test_seg_token_is_one_id(tmp_path):
  text = answer.target_text(PHRASES[0]) + " and " + answer.target_text(PHRASES[1])
  tok = train_toy_tokenizer([text, "x " + answer.IMAGE_TOKEN], tmp_path, vocab_size=300)
  assert tok.encode(text, add_special_tokens=False).count(seg_token_id(tok)) == answer.seg_count(text) == 2
