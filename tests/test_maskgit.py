"""MaskGIT's ImageBert generator (models/maskgit.py): golden parity (forward, masking, MLM loss, three
generate() runs), the objective against torch, the sampler's schedule, and the converter's checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from models import maskgit
from trainers import convert

TINY = dict(codebook_size=16, num_classes=3, seq_len=6, hidden=32, depth=1, heads=2, intermediate=64)


def test_golden_fixture(golden):
    assert convert.check(golden / "titok_maskgit.npz", verbose=True)


def test_mlm_loss_matches_torch_label_smoothed_cross_entropy():
    rng = np.random.RandomState(0)
    logits = rng.randn(3, 6, 16).astype(np.float32)
    targets = rng.randint(0, 16, (3, 6))
    masks = rng.rand(3, 6) < 0.5
    ce = torch.nn.CrossEntropyLoss(label_smoothing=0.1, reduction="none")(
        torch.tensor(logits).permute(0, 2, 1), torch.tensor(targets)).numpy()
    w = masks + (1 - masks) * 0.1
    expected = (ce * w).sum() / (w.sum() + 1e-8)
    loss, correct = maskgit.mlm_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(masks))
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    acc = ((logits.argmax(-1) == targets) * masks).sum(1) / (masks.sum(1) + 1e-8)
    np.testing.assert_allclose(float(correct), acc.mean(), rtol=1e-6)


def test_masking_follows_the_arccos_schedule():
    tokens = jnp.zeros((4000, 20), jnp.int32)
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    masked, masks = maskgit.mask_tokens(tokens, jax.random.uniform(k1, (4000,)), jax.random.uniform(k2, (4000, 20)), 16)
    counts = np.asarray(masks.sum(1))
    assert counts.min() >= 1 and counts.max() <= 20
    np.testing.assert_array_equal(np.asarray(masked)[np.asarray(masks)], 16)
    # E[acos(t) / (pi/2)] for t ~ U(0, 1) is 2/pi.
    assert abs(counts.mean() / 20 - 2 / np.pi) < 0.02


def test_guidance_schedules():
    assert maskgit.guidance_scales(4, 3.0, "constant") == [3.0] * 4
    assert maskgit.guidance_scales(4, 4.0, "linear") == [0.0, 1.0, 2.0, 3.0]
    pc = maskgit.guidance_scales(16, 12.5, "power-cosine", 3.0)
    assert pc[0] == 1.0 and all(a <= b for a, b in zip(pc, pc[1:])) and pc[-1] < 12.5
    with pytest.raises(ValueError, match="guidance_decay"):
        maskgit.guidance_scales(4, 3.0, "cosine")


def test_generate_fills_every_position_and_respects_the_class():
    model = maskgit.ImageBert(**TINY, rngs=nnx.Rngs(0))
    labels = jnp.array([0, 1, 2, 0])

    @jax.jit
    def both(r):
        # Temperature 0, no guidance: deterministic, so equal classes give equal codes.
        return (maskgit.generate(model, labels, r, num_steps=3, guidance_scale=2.0),
                maskgit.generate(model, labels, r, num_steps=3, guidance_scale=0.0, guidance_decay="constant",
                                 randomize_temperature=0.0))

    ids, greedy = (np.asarray(a) for a in both(jax.random.PRNGKey(0)))
    assert ids.shape == (4, 6) and ids.min() >= 0 and ids.max() < TINY["codebook_size"]
    np.testing.assert_array_equal(greedy[0], greedy[3])


def test_converter_refuses_a_tied_lm_head_and_unknown_keys(golden):
    meta, params, _, _, _ = convert.load_fixture(golden / "titok_maskgit.npz")
    g = meta["constructor"]["config"]["model"]["generator"]
    kwargs = dict(codebook_size=int(meta["constructor"]["config"]["model"]["vq_model"]["codebook_size"]),
                  num_classes=int(g["condition_num_classes"]), seq_len=int(g["image_seq_len"]),
                  hidden=int(g["hidden_size"]), depth=int(g["num_hidden_layers"]),
                  heads=int(g["num_attention_heads"]), intermediate=int(g["intermediate_size"]))
    maskgit.params_from_torch(params, kwargs)
    tied = dict(params)
    tied["model.lm_head.weight"] = params["model.embeddings.word_embeddings.weight"]
    with pytest.raises(ValueError, match="tie lm_head"):
        maskgit.params_from_torch(tied, kwargs)
    with pytest.raises(ValueError, match="keys the model does not"):
        maskgit.params_from_torch({**params, "model.pooler.dense.weight": np.zeros((2, 2))}, kwargs)
