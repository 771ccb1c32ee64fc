"""Tokenizer losses against their references: lpips (PyPI), taming's PatchGAN and GAN losses, LDM's weights."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from tokenizers import losses  # noqa: E402


def _merge(module_fn, params, rest=None):
    return losses.merge_module(nnx.eval_shape(module_fn), params, rest)


def test_reconstruction_losses():
    rs = np.random.RandomState(0)
    x, y = rs.randn(2, 4, 4, 3).astype(np.float32), rs.randn(2, 4, 4, 3).astype(np.float32)
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    np.testing.assert_allclose(losses.l1(x, y).mean(), torch.nn.functional.l1_loss(tx, ty).item(), rtol=1e-6)
    np.testing.assert_allclose(losses.l2(x, y).mean(), torch.nn.functional.mse_loss(tx, ty).item(), rtol=1e-6)


def test_lpips_matches_pypi_lpips_with_random_backbone():
    lpips = pytest.importorskip("lpips")
    torch.manual_seed(0)
    ref = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False).eval()
    # torchvision layout from the reference's slices (they keep torchvision's feature indices).
    vgg_sd = {f"features.{k.split('.')[2]}.{k.split('.')[3]}": v.numpy()
              for k, v in ref.state_dict().items() if k.startswith("net.slice")}
    lin_sd = {k: v.numpy() for k, v in ref.state_dict().items() if k.startswith("lin")}
    params = losses.lpips_params_from_torch(vgg_sd, lin_sd)
    ours = _merge(lambda: losses.LPIPS(nnx.Rngs(0)), params)
    rs = np.random.RandomState(1)
    x = rs.uniform(-1, 1, (2, 3, 32, 32)).astype(np.float32)
    y = np.clip(x + 0.3 * rs.randn(*x.shape), -1, 1).astype(np.float32)
    with torch.no_grad():
        expected = ref(torch.from_numpy(x), torch.from_numpy(y)).numpy().reshape(-1)
    got = np.asarray(jax.jit(ours)(x.transpose(0, 2, 3, 1), y.transpose(0, 2, 3, 1)))
    assert np.all(expected > 0)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


def test_legacy_torch_checkpoint_reader_matches_torch_load():
    path = losses.default_lpips_lin_path()
    if path is None:
        pytest.skip("the lpips wheel is not installed")
    ours = losses.load_torch_state_dict(path)
    ref = torch.load(path, map_location="cpu", weights_only=True)
    assert sorted(ours) == sorted(ref)
    for k in ref:
        np.testing.assert_array_equal(ours[k], ref[k].numpy())


def test_missing_vgg_weights_name_the_file_and_the_url(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        losses.load_lpips_params(tmp_path / "nope.pth")
    assert losses.VGG16_FILE in str(err.value) and losses.VGG16_URL in str(err.value)


def _taming_discriminator(in_ch, ndf, n_layers):
    """The reference layout of taming's NLayerDiscriminator (use_actnorm=False), built from torch.nn."""
    nn = torch.nn
    seq = [nn.Conv2d(in_ch, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
    mult = 1
    for n in range(1, n_layers):
        prev, mult = mult, min(2**n, 8)
        seq += [nn.Conv2d(ndf * prev, ndf * mult, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2, True)]
    prev, mult = mult, min(2**n_layers, 8)
    seq += [nn.Conv2d(ndf * prev, ndf * mult, 4, 1, 1, bias=False), nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2, True)]
    seq += [nn.Conv2d(ndf * mult, 1, 4, 1, 1)]
    model = nn.Module()
    model.main = nn.Sequential(*seq)
    return model


@pytest.mark.parametrize("train", [True, False])
def test_patchgan_matches_taming_layout(train):
    torch.manual_seed(0)
    ref = _taming_discriminator(3, 8, 3)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.copy_(torch.randn_like(p) * (0.1 if p.ndim > 1 else 0.3) + (1.0 if name.endswith("1.weight") else 0.0))
        for name, b in ref.named_buffers():
            if b.dtype.is_floating_point:
                b.copy_(torch.rand_like(b) + (0.5 if "var" in name else 0.0))
    sd = {k.removeprefix("main."): v.numpy().copy() for k, v in ref.state_dict().items()}
    sd = {f"main.{k}": v for k, v in sd.items()}
    disc = losses.NLayerDiscriminator(3, 8, 3, rngs=nnx.Rngs(0))
    params, stats = losses.discriminator_from_torch(sd, disc)
    ours = _merge(lambda: losses.NLayerDiscriminator(3, 8, 3, rngs=nnx.Rngs(0)), params, stats)
    x = np.random.RandomState(0).randn(4, 3, 32, 32).astype(np.float32)
    ref.train(train)
    with torch.no_grad():
        expected = ref.main(torch.from_numpy(x)).numpy().transpose(0, 2, 3, 1)
    got = np.asarray(ours(jnp.asarray(x.transpose(0, 2, 3, 1)), train=train))
    assert got.shape == expected.shape == (4, 2, 2, 1)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_gan_losses_match_taming():
    rs = np.random.RandomState(0)
    real, fake = rs.randn(4, 3, 3, 1).astype(np.float32), rs.randn(4, 3, 3, 1).astype(np.float32)
    tr, tf = torch.from_numpy(real), torch.from_numpy(fake)
    F = torch.nn.functional
    hinge = 0.5 * (torch.mean(F.relu(1.0 - tr)) + torch.mean(F.relu(1.0 + tf)))
    vanilla = 0.5 * (torch.mean(F.softplus(-tr)) + torch.mean(F.softplus(tf)))
    np.testing.assert_allclose(losses.hinge_d_loss(real, fake), hinge.item(), rtol=1e-6)
    np.testing.assert_allclose(losses.vanilla_d_loss(real, fake), vanilla.item(), rtol=1e-6)
    np.testing.assert_allclose(losses.generator_loss(fake, "hinge"), -tf.mean().item(), rtol=1e-6)
    np.testing.assert_allclose(losses.generator_loss(fake, "non_saturating"), F.softplus(-tf).mean().item(), rtol=1e-6)
    # LeCAM as MaskGIT/TiTok write it.
    ema_r, ema_f = 0.3, -0.2
    lecam = torch.mean(torch.pow(F.relu(tr - ema_f), 2)) + torch.mean(torch.pow(F.relu(ema_r - tf), 2))
    np.testing.assert_allclose(losses.lecam_regularization(real, fake, ema_r, ema_f), lecam.item(), rtol=1e-6)
    np.testing.assert_allclose(losses.lecam_update(ema_r, real, 0.9), 0.9 * ema_r + 0.1 * real.mean(), rtol=1e-6)


def test_adopt_weight_is_the_discriminator_start_step():
    assert float(losses.adopt_weight(1.0, 9, 10)) == 0.0
    assert float(losses.adopt_weight(1.0, 10, 10)) == 1.0


def test_adaptive_weight_matches_ldm_autograd():
    """LDM: torch.autograd.grad of nll and g loss at the last layer, norm ratio, clamp, detach."""
    rs = np.random.RandomState(0)
    w = rs.randn(3, 5).astype(np.float32)
    x = rs.randn(7, 5).astype(np.float32)
    tw = torch.tensor(w, requires_grad=True)
    out = torch.from_numpy(x) @ tw.T
    nll, g = out.abs().sum(), -(out**2).mean()
    gn = torch.autograd.grad(nll, tw, retain_graph=True)[0]
    gg = torch.autograd.grad(g, tw)[0]
    expected = torch.clamp(torch.norm(gn) / (torch.norm(gg) + 1e-4), 0.0, 1e4).item()
    jn = jax.grad(lambda w: jnp.abs(x @ w.T).sum())(w)
    jg = jax.grad(lambda w: -jnp.mean((x @ w.T) ** 2))(w)
    np.testing.assert_allclose(losses.adaptive_weight(jn, jg), expected, rtol=1e-5)


def test_decoder_only_stage_updates_the_decoder_alone_and_discriminator_step_keeps_batch_stats():
    import optax

    params = {"encoder": {"w": jnp.ones((3,))}, "decoder": {"w": jnp.ones((3,))}}
    grads = jax.tree.map(jnp.ones_like, params)
    tx = optax.adamw(0.1, weight_decay=0.5)
    for finetune, moved in ((False, {"encoder", "decoder"}), (True, {"decoder"})):
        frozen = losses.decoder_only_frozen(grads, jnp.asarray(finetune))
        new, _, masked = losses.masked_update(tx, grads, tx.init(params), params, frozen)
        for key in params:
            changed = not np.allclose(new[key]["w"], params[key]["w"])
            assert changed == (key in moved), (finetune, key)
            assert np.all(masked[key]["w"] == (1.0 if key in moved else 0.0))
    ema = losses.ema_update(params, jax.tree.map(jnp.zeros_like, params), 0.9)
    np.testing.assert_allclose(ema["decoder"]["w"], 0.9)

    disc_abstract = nnx.eval_shape(lambda: losses.NLayerDiscriminator(3, 8, 1, rngs=nnx.Rngs(0)))
    _, dp, ds = nnx.split(losses.NLayerDiscriminator(3, 8, 1, rngs=nnx.Rngs(0)), nnx.Param, ...)
    disc = {"params": nnx.to_pure_dict(dp), "batch_stats": nnx.to_pure_dict(ds)}
    disc["opt_state"] = tx.init(disc["params"])
    real = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))
    new, aux = losses.discriminator_update(tx, disc_abstract, disc, real, -real)
    assert set(aux) == {"d_loss", "logits_real", "logits_fake"} and np.isfinite(float(aux["d_loss"]))
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != b)), new["batch_stats"], disc["batch_stats"]))
    assert any(moved)  # the BatchNorm running statistics come back from the train-mode calls
    assert jax.tree.structure(new["params"]) == jax.tree.structure(disc["params"])
