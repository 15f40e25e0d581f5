"""The base experiment config every file in experiments/ starts from (big_vision style)."""
from __future__ import annotations

import ml_collections

from segearth_jax import presets


def base_config(model_size: str = "tiny") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = presets.model_config(model_size)

  c.data = ml_collections.ConfigDict(dict(
      name="laserss",             # TFDS builder name in tfds_laserss/
      data_dir="",                # TFDS data dir (built ArrayRecords)
      tokenizer="",               # local tokenizer folder (Phi-2 for real runs; the toy one is saved with toy data)
      text_buckets=(128, 256),    # sequence lengths to pad to (static shapes: one compile per bucket)
      max_len=256,                # longer sequences are cut (answer end kept)
      # the whole conversation: a preset of data/templates.py ('phi_chat', 'phi_chat_eval', 'toy',
      # 'authors_train', 'authors_eval') or a literal template with '<image>', '{instruction}', '{answer}'
      train_template="phi_chat",
      eval_template="phi_chat_eval",
      strip_instruction=False,    # strip the instruction's surrounding whitespace first (the authors do)
      shuffle_seed=0,
      # training mixture: ((builder, split, weight), ...), each built in data_dir, e.g.
      # (("laserss", "train", 0.8), ("rrsisd", "train", 0.2)); () = name's train split alone. Eval reads
      # name. The mix: data/pipeline.py (WeightedSelection)
      mixture=(),
      workers=0,                  # grain worker processes (0 = in-process)
      skip_bad=False,
  ))

  c.loss = ml_collections.ConfigDict(dict(
      text_weight=1.0, bce_weight=5.0, dice_weight=5.0,
      lambda_s=0.01,              # attention-supervision weight (0 disables)
      ls_form="paper",            # 'paper' (layer/head-averaged map) | 'baseline' (per layer, heads summed, summed)
      ls_target="touches",        # the L_S patch grid: 'touches' (every patch the mask touches) | 'authors'
                                  # (nearest to 800 px, bilinear to the grid, > 0: patch centres)
      ls_divisor="kept",          # L_S mean over: 'kept' (rows with a foreground) | 'all' (every real [SEG] row,
                                  # empty-target ones included: the authors' batchmean)
      num_points=12544, oversample_ratio=3.0, importance_sample_ratio=0.75,
  ))

  c.train = ml_collections.ConfigDict(dict(
      steps=5000, batch_size=8, grad_accum=1, seed=0,
      lr=5e-5, warmup_ratio=0.03, schedule="cosine", weight_decay=0.0, grad_clip=1.0,
      b1=0.9, b2=0.999,
      # which parts train. Frozen parts get no optimizer state.
      trainable=("lora", "lm_head", "seg_projector", "pixel_decoder", "mask_decoder"),
      log_every=10, ckpt_every=500, keep_checkpoints=3,
      # evaluation while training: every eval_every steps (0 = off) generate on the first eval_examples
      # records (0 = all) of eval_split and log gIoU/cIoU (metrics.jsonl records with kind 'eval', TensorBoard
      # '<split>/...'); the step with the highest best_metric (a dotted path into the eval result, e.g.
      # 'overall.gIoU', 'subsets.single.cIoU', 'mean_over_subsets'; '' = none) is kept as the workdir W/best
      eval_every=0, eval_examples=0, eval_split="val", best_metric="overall.gIoU",
      init_from="",               # a workdir/weights folder from `segearth convert from-hf`
      # per-part learning-rate multipliers, {part: x}: the innermost path component named wins, e.g.
      # dict(llm=0.2) with lr 1e-3 trains llm/... at 2e-4; parts not named use 1
      lr_scale=ml_collections.ConfigDict(),
      # 'segearth': the loss of method.md §4; 'text': next-token loss only, mask head not run (pre-trains a
      # from-scratch MLLM, e.g. the toy's, before the SegEarth-R2 stage: experiments/toy_text.py)
      objective="segearth",
  ))

  # how `segearth eval` scores (every eval JSON records it under "protocol")
  c.eval = ml_collections.ConfigDict(dict(
      gt_resize="letterbox",      # 'letterbox': GT letterboxed like the image (nearest), scored on the image
                                  # region; 'authors': GT stretched bilinearly to the canvas (> 0), whole canvas
      teacher_forced=False,       # score the masks of the reference answer's [SEG] (no generation)
      dtype="",                   # compute dtype for eval ('' = model.dtype; the authors' eval runs 'float32')
  ))

  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))  # -1 = the rest of the devices
  c.distributed = ml_collections.ConfigDict(dict(
      enabled=False, coordinator_address="", num_processes=1, process_id=0, local_device_ids=()))

  # decoding (segearth_jax/generate.py): temperature 0 = greedy; top_k 0 / top_p 1.0 = off; seed: the sampling
  # key; max_seg: [SEG] slots generation fills and the mask head decodes, -1 = model.max_seg, 0 = no cap
  # (max_new_tokens slots), n = n. DECODING_PRESETS below name whole settings.
  c.infer = ml_collections.ConfigDict(dict(max_new_tokens=128, temperature=0.0, top_k=0, top_p=1.0, seed=0,
                                           max_seg=-1))
  return c


# Named `infer` settings (apply_decoding). 'authors': SegEarth-R2's eval.py, which calls transformers'
# generate with do_sample=True, temperature 0.2, num_beams 1, max_new_tokens 128 and the tokenizer's EOS
# (50256 for Phi-2), so transformers' default top_k 50 and top_p 1.0 apply, and decodes every [SEG] it generates.
DECODING_PRESETS = {
    "greedy": dict(temperature=0.0, top_k=0, top_p=1.0, max_seg=-1),
    "authors": dict(temperature=0.2, top_k=50, top_p=1.0, max_new_tokens=128, max_seg=0),
}


def apply_decoding(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """Sets ``config.infer`` to the DECODING_PRESETS entry ``name`` (fields it does not name, e.g. the seed,
  stay); returns the config."""
  if name not in DECODING_PRESETS:
    raise ValueError(f"decoding preset {name!r}: one of {', '.join(DECODING_PRESETS)}")
  config.infer.update(DECODING_PRESETS[name])
  return config
