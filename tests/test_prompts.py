"""Prompt templates: the authors' eval and training texts, byte for byte and id for id against their
construction written out here; the toy's and the old defaults' token ids unchanged; template errors."""
import os
import re

import pytest

from segearth_jax import experiment
from segearth_jax.config import load_config
from segearth_jax.data import templates
from segearth_jax.data.preprocess import Preprocessor
from segearth_jax.data.tokenizer import image_token_id, seg_token_id, train_toy_tokenizer
from segearth_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# --- the authors' strings, typed from SegEarth-R2 eval.py / dataset.py and their conversation modules --------
THEIR_EVAL_PREFIX = (
    "This is an image \n<image>\n. If the instruction is a question, provide segmentation "
    "result + explanation; if it's a declarative phrase, provide only the segmentation result\n. "
    "Please doing Referring or Reasoning Segmentation according to the following instruction:")
THEIR_LLAVA_PHI_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the "
    "user provides, and assist the user with a variety of tasks using natural language.")
THEIR_TRAIN_PREFIX = ("This is an image \n<image>\n, please doing Reasoning Segmentation according to the "
                      "following instruction:")
THEIR_PHI_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                    "The assistant gives helpful, detailed, and polite answers to the user's questions.")
EOT = "<|endoftext|>"


def their_eval_text(text: str) -> str:
  """eval.py: instruction = text.strip(); human = prefix + '\\n' + instruction, gpt = ''; 'llava_phi'
  (LLaMA-2 style): sep + '[INST] ' + <<SYS>> block + human + ' [/INST]', an empty gpt turn adds nothing,
  then lstrip of the sep's characters."""
  human = THEIR_EVAL_PREFIX + "\n" + text.strip()
  msg = f"<<SYS>>\n{THEIR_LLAVA_PHI_SYSTEM}\n<</SYS>>\n\n" + human
  return (EOT + f"[INST] {msg} [/INST]").lstrip(EOT)


def their_train_text(answer: str) -> str:
  """dataset.py + Mipha's 'phi-2' (conv_phi_v0, separator style TWO, sep ' ', sep2 eos): the human turn
  holds '<refer>' (the instruction's embeddings + [SEG]), the gpt turn is '\\n' + answer."""
  human = THEIR_TRAIN_PREFIX + "\n<refer> <|assistant|>"
  return THEIR_PHI_SYSTEM + " " + "USER: " + human + " " + "ASSISTANT: " + "\n" + answer + EOT


def their_ids(text: str, tok, refer=None) -> list[int]:
  """Their tokenizer_special_tokens: split on <image>/<refer>, each other chunk tokenized whole; <image> is
  one id here (our image id); <refer> becomes `refer` (their token_refer_id)."""
  out = []
  for chunk in re.split("(<image>|<refer>)", text):
    if chunk == "<image>":
      out.append(image_token_id(tok))
    elif chunk == "<refer>":
      out.extend(refer)
    elif chunk:
      out.extend(tok.encode(chunk, add_special_tokens=False))
  return out


INSTRUCTIONS = [
    "Segment the ships near the harbour.",
    "  which storage tanks are closest to the road? \n",
    "3 airplanes parked at the gate",
    "Where is the largest building?",
    "the field's northern part;\nand the river",
]
ANSWERS = ["<p>the ships</p>[SEG] are moored.", "The tanks <p>near the road</p>[SEG][SEG].",
           "<p>airplane 1</p>[SEG]", "[SEG]"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  texts = [templates.render(p, i, a) for p in templates.PRESETS for i in INSTRUCTIONS for a in ANSWERS]
  texts += [f"a{i} \n\nb" for i in range(50)]   # teaches the merge ' \n' (as Phi-2 has it)
  tok = train_toy_tokenizer(texts, tmp_path_factory.mktemp("tok"), vocab_size=700)
  # so a prompt piece ending in ' \n' would tokenize differently from their whole chunk ' ', '\n', answer
  assert len(tok.encode(" \n", add_special_tokens=False)) == 1
  return tok


def _config(train_template, eval_template, strip):
  c = experiment.base_config("tiny")
  c.model.vision.image_size, c.model.vision.patch_size = 28, 14   # 4 image tokens
  c.data.train_template, c.data.eval_template, c.data.strip_instruction = train_template, eval_template, strip
  c.data.text_buckets, c.data.max_len = (512,), 512
  return c


def _collapse_image(ids, image_id):
  """Our ids have N_img image ids in a row; theirs one placeholder."""
  out = []
  for t in ids:
    if not (t == image_id and out and out[-1] == image_id):
      out.append(t)
  return out


@pytest.mark.parametrize("text", INSTRUCTIONS)
def test_authors_eval_prompt_bytes_and_ids(tok, text):
  assert templates.render("authors_eval", text.strip()) == their_eval_text(text)
  pre = Preprocessor(_config("phi_chat", "authors_eval", True), tok, train=False)
  ids, labels, image_start, prompt_len = pre.tokens(text, None)
  assert prompt_len == len(ids) and set(labels) == {-100}
  assert ids[image_start:image_start + pre.n_img] == [image_token_id(tok)] * pre.n_img
  assert _collapse_image(ids, image_token_id(tok)) == their_ids(their_eval_text(text), tok)


@pytest.mark.parametrize("text", INSTRUCTIONS)
@pytest.mark.parametrize("answer", ANSWERS)
def test_authors_train_ids(tok, text, answer):
  pre = Preprocessor(_config("authors_train", "authors_eval", True), tok, train=True)
  ids, labels, _, prompt_len = pre.tokens(text, answer)
  refer = tok.encode(text.strip(), add_special_tokens=False) + [seg_token_id(tok)]
  assert _collapse_image(ids, image_token_id(tok)) == their_ids(their_train_text(answer), tok, refer)
  # the rendered text is theirs with <refer> spelled out
  full = templates.render("authors_train", text.strip(), answer)
  assert full == their_train_text(answer).replace("<refer>", text.strip() + "[SEG]")
  # labels: exactly the answer turn (" \n" + answer + eos), after the prompt
  answer_ids = tok.encode(" \n" + answer + EOT, add_special_tokens=False)
  assert ids[prompt_len:] == answer_ids and labels == [-100] * prompt_len + answer_ids


def _old_ids(tok, n_img, system, prompt, instruction, answer):
  """The pre-issue-14 formula: f"{system}{sep}{user}: " + prompt pieces + f"{sep}{assistant}:", answer
  f" {answer}{eos}" (sep ' ', roles USER/ASSISTANT, eos <|endoftext|>), each piece tokenized alone."""
  enc = lambda s: tok.encode(s, add_special_tokens=False) if s else []
  head, rest = prompt.split("<image>")
  mid, tail = rest.split("{instruction}")
  ids = enc(f"{system} USER: " + head) + [image_token_id(tok)] * n_img + enc(mid) + enc(instruction)
  ids += enc(tail + " ASSISTANT:")
  return ids, ids + (enc(f" {answer}{EOT}") if answer is not None else [])


@pytest.mark.parametrize("text", INSTRUCTIONS)
def test_toy_ids_unchanged(tok, text):
  c = load_config(os.path.join(REPO, "experiments", "toy.py"))
  for train in (True, False):
    pre = Preprocessor(c, tok, train=train)
    for answer in ANSWERS:
      got, _, _, prompt_len = pre.tokens(text, answer if train else None)
      prompt, full = _old_ids(tok, pre.n_img, "", "<image>\n{instruction}", text, answer)
      assert got == (full if train else prompt) and prompt_len == len(prompt)


@pytest.mark.parametrize("text", INSTRUCTIONS)
def test_default_templates_ids_unchanged(tok, text):
  """base_config's defaults are the old system / train_prompt / eval_prompt fields' conversation."""
  c = experiment.base_config("tiny")
  c.data.text_buckets, c.data.max_len = (512,), 512
  for train, prompt in ((True, templates.TRAIN_PROMPT), (False, templates.EVAL_PROMPT)):
    pre = Preprocessor(c, tok, train=train)
    got, _, _, _ = pre.tokens(text, ANSWERS[0] if train else None)
    want = _old_ids(tok, pre.n_img, templates.PHI_SYSTEM, prompt, text, ANSWERS[0])[1 if train else 0]
    assert got == want


def test_literal_template_and_strip(tok):
  lit = "Q: <image> {instruction}\nA: {answer}!"
  t = templates.parse(lit)
  assert t.prompt == ("Q: ", "<image>", " ", "{instruction}", "\nA:") and (t.answer_lead, t.answer_end) == (" ", "!")
  assert templates.render(lit, "x", "y") == "Q: <image> x\nA: y!"
  assert templates.render(lit, "x") == "Q: <image> x\nA:"
  pre = Preprocessor(_config(lit, lit, False), tok, train=False)
  raw, _, _, _ = pre.tokens("  ships ", None)
  pre_strip = Preprocessor(_config(lit, lit, True), tok, train=False)
  stripped, _, _, _ = pre_strip.tokens("  ships ", None)
  assert raw != stripped and stripped == pre.tokens("ships", None)[0]


@pytest.mark.parametrize("bad, match", [
    ("no_such_preset", "unknown prompt template preset 'no_such_preset'"),
    ("<image> {answer} {instruction}", "once each, in that order"),
    ("<image> {instruction}", "once each"),
    ("<image><image> {instruction} {answer}", "once each"),
])
def test_template_errors(bad, match):
  with pytest.raises(UserError, match=match):
    templates.parse(bad)
