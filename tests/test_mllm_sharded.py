"""The jitted MLLM forward + text loss + L_S (and its gradients) on an 8-device CPU mesh
(fsdp=4 x tensor=2, params sharded by the logical-axis table) equal the unsharded run."""
import flax.linen as nn
import jax
import numpy as np

from segearth_jax import presets, sharding
from segearth_jax.attention_supervision import ls_loss
from segearth_jax.losses import text_loss
from segearth_jax.models.mllm import MLLM
from segearth_jax.models.segearth import ModelConfig


def tiny_cfg():
  cfg = presets.model_config("tiny")
  cfg.vision.image_size = 56                      # 4x4 = 16 image tokens
  cfg.vision.num_hidden_layers = 1
  cfg.vision.hidden_size, cfg.vision.intermediate_size = 32, 64
  cfg.llm.hidden_size, cfg.llm.intermediate_size = 64, 128
  cfg.llm.vocab_size = 128                        # a multiple of 64: splits over tensor=2
  cfg.llm.partial_rotary_factor = 0.25
  cfg.lora.rank = 4
  cfg.attention_impl = "fused"
  cfg.remat_policy = "none"
  return ModelConfig.from_dict(cfg)


def test_sharded_forward_loss_and_grads_equal_unsharded():
  cfg = tiny_cfg()
  model = MLLM(cfg)
  b, l, n_img = 4, 32, presets.image_tokens(cfg)
  rng = np.random.default_rng(0)
  batch = dict(
      siglip_image=rng.standard_normal((b, 56, 56, 3)).astype(np.float32),
      input_ids=rng.integers(0, 128, (b, l)).astype(np.int32),
      attention_mask=np.ones((b, l), np.int32),
      image_start=np.array([1, 2, 1, 3], np.int32),
      seg_positions=np.array([[24, 27], [25, 30], [26, 0], [28, 29]], np.int32),
      seg_valid=np.array([[1, 1], [1, 1], [1, 0], [1, 1]], bool),
      grid=(rng.random((b, 2, n_img)) > 0.5).astype(np.float32))
  batch["attention_mask"][2, 29:] = 0
  batch["labels"] = np.where(np.arange(l)[None] >= 20, batch["input_ids"], -100).astype(np.int32)

  boxed = jax.jit(model.init)(jax.random.PRNGKey(0), {k: v[:1] for k, v in batch.items()})["params"]
  assert set(boxed) == {"vision", "projector", "llm"}
  params = nn.meta.unbox(boxed)
  params = jax.tree_util.tree_map_with_path(  # non-zero LoRA B so its path matters
      lambda p, x: x + 0.05 if "lora" in jax.tree_util.keystr(p) else x, params)

  def loss_fn(params, batch):
    out = model.apply({"params": params}, batch)
    lt = text_loss(out["logits"], batch["labels"])
    ls = ls_loss(out["seg_attn"], batch["grid"], batch["seg_valid"], num_heads=cfg.llm.num_attention_heads)
    return lt + 0.01 * ls, (lt, ls, out["logits"])

  step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  (v0, (lt0, ls0, lg0)), g0 = step(params, batch)

  mesh = sharding.make_mesh(data=1, fsdp=4, tensor=2)
  p_shard = sharding.logical_shardings(boxed, mesh)
  b_shard = {k: sharding.batch_sharding(mesh, np.ndim(v)) for k, v in batch.items()}
  with sharding.in_mesh(mesh):
    sp = jax.device_put(params, p_shard)
    sb = jax.device_put(batch, b_shard)
    sstep = jax.jit(jax.value_and_grad(loss_fn, has_aux=True), in_shardings=(p_shard, b_shard),
                    out_shardings=((sharding.replicated(mesh), (sharding.replicated(mesh),) * 2
                                    + (sharding.batch_sharding(mesh, 3),)), p_shard))
    (v1, (lt1, ls1, lg1)), g1 = sstep(sp, sb)

  # the params really are split: q_proj kernel over fsdp (embed) and tensor (heads)
  q = sp["llm"]["layers"]["self_attn"]["q_proj"]["kernel"]
  assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
  assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape == (2, 16, 32)
  assert np.isfinite(float(v0)) and float(ls0) != 0.0
  for a, c in ((v0, v1), (lt0, lt1), (ls0, ls1)):
    assert abs(float(a) - float(c)) <= 1e-5, (float(a), float(c))
  assert np.abs(np.asarray(lg0) - np.asarray(lg1)).max() <= 1e-4
  diffs = jax.tree_util.tree_map(lambda a, c: float(np.abs(np.asarray(a) - np.asarray(c)).max()), g0, g1)
  assert max(jax.tree_util.tree_leaves(diffs)) <= 1e-5
  assert float(np.abs(np.asarray(g0["llm"]["layers"]["self_attn"]["q_proj"]["lora"]["a"])).max()) > 0
