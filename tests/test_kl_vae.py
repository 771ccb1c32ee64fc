"""KL-VAE: golden fixture, checkpoint converters (MAR kl16, SD-VAE LDM and diffusers), bad input,
the GAN train step (one device and 8 simulated devices), and a short training run that learns."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from configs import kl_vae_f16  # noqa: E402
from tokenizers import kl_vae  # noqa: E402
from trainers import convert  # noqa: E402
from tests.conftest import TEST_XLA_FLAGS, run_python  # noqa: E402

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "golden" / "kl16_vae.npz"
REPO = Path(__file__).resolve().parents[1]


def tiny_config(**loss):
    c = kl_vae_f16.get_config("demo")
    c.data.image_size = 16
    m = c.model
    m.ch, m.norm_groups, m.ch_mult, m.num_res_blocks, m.resolution, m.embed_dim = 16, 8, (1, 2), 1, 16, 4
    m.loss.disc_ndf, m.loss.disc_layers = 8, 2
    for k, v in loss.items():
        m.loss[k] = v
    c.batch_size = 8
    return c


def fixture_config(meta):
    """configs/kl_vae_f16.py with the fixture's recorded sizes."""
    enc = meta["constructor"]["Encoder"]
    c = kl_vae_f16.get_config()
    c.model.ch = enc["ch"]
    c.model.ch_mult = tuple(meta["constructor"]["AutoencoderKL"]["ch_mult"])
    c.model.embed_dim = meta["constructor"]["AutoencoderKL"]["embed_dim"]
    return c


needs_fixture = pytest.mark.skipif(not FIXTURE.exists(), reason=f"golden fixture {FIXTURE} not present")


@needs_fixture
def test_golden_fixture_kl16_vae():
    assert convert.check(FIXTURE, verbose=True)


@needs_fixture
def test_importers_read_kl16_and_ldm_sd_layouts_identically():
    meta, params, _, _, _ = convert.load_fixture(FIXTURE)
    config = fixture_config(meta)
    ours = kl_vae.import_kl16({**params, "loss.logvar": np.zeros(())}, config)
    # The same weights as a Stable-Diffusion checkpoint: prefixed, beside unrelated entries.
    sd_ckpt = {f"first_stage_model.{k}": v for k, v in params.items()}
    sd_ckpt["model.diffusion_model.x.weight"] = np.zeros((2, 2))
    ldm = kl_vae.import_sd_vae(sd_ckpt, config)
    jax.tree.map(np.testing.assert_array_equal, ours, ldm)
    np.testing.assert_array_equal(ours["encoder"]["down"][2]["block"][0]["nin_shortcut"]["kernel"],
                                  params["encoder.down.2.block.0.nin_shortcut.weight"].transpose(2, 3, 1, 0))
    # A checkpoint for another model is refused with the offending keys named.
    config.model.embed_dim = 8
    with pytest.raises(ValueError, match="does not fit"):
        kl_vae.import_kl16(params, config)


_DIFFUSERS_VAE = """
import sys, numpy as np, torch, diffusers
from safetensors.torch import save_file
torch.manual_seed(0)
ref = diffusers.AutoencoderKL(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), layers_per_block=1,
    latent_channels=4, norm_num_groups=32, sample_size=32).eval()
with torch.no_grad():
    for name, p in ref.named_parameters():
        if p.ndim == 1:  # non-trivial norms and biases, so a wrong mapping cannot pass
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, sys.argv[1])
rs = np.random.RandomState(0)
x = rs.uniform(-1, 1, (2, 3, 32, 32)).astype(np.float32)
z = rs.randn(2, 4, 16, 16).astype(np.float32)
with torch.no_grad():
    dist = ref.encode(torch.from_numpy(x)).latent_dist
    dec = ref.decode(torch.from_numpy(z)).sample.numpy()
np.savez(sys.argv[2], x=x, z=z, mean=dist.mean.numpy(), logvar=dist.logvar.numpy(), dec=dec)
"""


def test_sd_vae_parity_with_diffusers(tmp_path):
    pytest.importorskip("diffusers")
    # diffusers imports transformers, which imports Hugging Face's `tokenizers`: the zoo's package of that
    # name shadows it in this process, so the reference runs outside the repo root.
    script = tmp_path / "diffusers_vae.py"
    script.write_text(_DIFFUSERS_VAE)
    path, ref_path = tmp_path / "diffusion_pytorch_model.safetensors", tmp_path / "ref.npz"
    run_python([str(script), str(path), str(ref_path)], cwd=tmp_path, timeout=600)
    ref = np.load(ref_path)

    c = kl_vae_f16.get_config()
    m = c.model
    m.embed_dim, m.ch, m.ch_mult, m.num_res_blocks, m.resolution = 4, 32, (1, 2), 1, 32
    m.enc_attn_resolutions, m.dec_attn_resolutions = (), ()
    params = kl_vae.import_sd_vae(kl_vae.load_state_dict(path), c)
    method = kl_vae.KLVAEMethod(c)
    model = method.model_def.merge(jax.tree.map(jnp.asarray, params))

    moments = method.encode(model, jnp.asarray(ref["x"].transpose(0, 2, 3, 1)))
    mean, logvar, _ = kl_vae.gaussian_parameters(moments)
    dec = model.decode(jnp.asarray(ref["z"].transpose(0, 2, 3, 1)))
    for ours, want in ((mean, ref["mean"]), (logvar, ref["logvar"]), (dec, ref["dec"])):
        err = np.abs(np.asarray(ours).transpose(0, 3, 1, 2) - want).max()
        assert err <= 1e-4 * max(1.0, np.abs(want).max()), err


def test_bad_images_are_clear_errors():
    method = kl_vae.KLVAEMethod(tiny_config())
    good = np.zeros((2, 16, 16, 1), np.float32)
    method.check_images(good)
    with pytest.raises(ValueError, match="channels"):
        method.check_images(np.zeros((2, 1, 16, 16), np.float32))  # NCHW
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        method.check_images(good + 2.0)
    with pytest.raises(ValueError, match="float"):
        method.check_images(good.astype(np.uint8))
    with pytest.raises(ValueError, match="divisible"):
        method.check_images(np.zeros((2, 15, 16, 1), np.float32))
    with pytest.raises(ValueError, match="NHWC"):
        method.check_images(np.zeros((16, 16, 1), np.float32))


def test_config_errors_name_the_field():
    c = tiny_config()
    c.model.norm_groups = 32
    with pytest.raises(ValueError, match="norm_groups"):
        kl_vae.KLVAEMethod(c).validate_config(c)
    c = tiny_config(perceptual_weight=1.0, vgg_path="/nonexistent/vgg16-397923af.pth")
    with pytest.raises(FileNotFoundError, match="download.pytorch.org"):
        kl_vae.KLVAEMethod(c).validate_config(c)


def _batch(n=8, size=16, seed=0):
    rs = np.random.RandomState(seed)
    return {"image": jnp.asarray(rs.uniform(-1, 1, (n, size, size, 1)), jnp.float32),
            "label": jnp.zeros((n,), jnp.int32)}


def test_train_step_updates_generator_and_starts_discriminator_on_time():
    config = tiny_config(disc_start=1, lecam_weight=0.001)
    method = kl_vae.KLVAEMethod(config)
    state = method.init_train_state(jax.random.PRNGKey(0))
    step = jax.jit(method.train_step)
    batch = _batch()
    s1, m1 = step(state, batch, jax.random.PRNGKey(1))
    assert all(np.isfinite(float(v)) for v in m1.values()), m1
    assert int(s1["step"]) == 1 and float(m1["disc_factor"]) == 0.0
    leaves = lambda t: jax.tree.leaves(t)  # noqa: E731
    # Before disc_start: generator moves, discriminator does not, loss has no GAN term.
    assert any(np.abs(a - b).max() > 0 for a, b in zip(leaves(state["params"]), leaves(s1["params"])))
    assert all(np.array_equal(a, b) for a, b in zip(leaves(state["disc"]["params"]), leaves(s1["disc"]["params"])))
    np.testing.assert_allclose(m1["loss"], m1["nll_loss"] + config.model.loss.kl_weight * m1["kl_loss"], rtol=1e-6)
    # ...and equals the plain loop's objective (method.loss) on the same noise.
    plain, _ = method.loss(method.model_def.merge(state["params"]), batch, jax.random.PRNGKey(1))
    np.testing.assert_allclose(plain, m1["loss"], rtol=1e-5)
    s2, m2 = step(s1, batch, jax.random.PRNGKey(2))
    assert float(m2["disc_factor"]) == 1.0 and float(m2["d_weight"]) > 0
    assert any(np.abs(a - b).max() > 0 for a, b in zip(leaves(s1["disc"]["params"]), leaves(s2["disc"]["params"])))
    assert float(s2["lecam"]["real"]) != 0.0
    # The state is pure dicts, optax states and arrays: what orbax saves.
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(s2))


@pytest.mark.slow
def test_short_training_run_reduces_reconstruction_error(tmp_path):
    from trainers import data

    config = tiny_config(disc_start=60)
    config.data.cache_dir = str(tmp_path / "data")
    config.optim.lr = 1e-3
    method = kl_vae.KLVAEMethod(config)
    it = data.create_iterator(config, seed=0, global_batch_size=config.batch_size)
    held_out = jnp.asarray(np.concatenate([next(it)["image"] for _ in range(2)]))

    @jax.jit
    def recon_error(params):
        return jnp.mean(jnp.abs(method.reconstruct(method.model_def.merge(params), held_out) - held_out))

    state = method.init_train_state(jax.random.PRNGKey(0))
    before = float(recon_error(state["params"]))
    step = jax.jit(method.train_step)
    for i in range(80):
        batch = next(it)
        state, metrics = step(state, {k: jnp.asarray(v) for k, v in batch.items()}, jax.random.PRNGKey(i))
    after = float(recon_error(state["params"]))
    print(f"reconstruction L1 on held-out digits: {before:.4f} -> {after:.4f}")
    assert np.isfinite(float(metrics["loss"]))
    assert after < 0.5 * before, (before, after)


@pytest.mark.slow
def test_sharded_train_step_matches_single_device():
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count=8 {TEST_XLA_FLAGS}", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, __file__, "sharded-worker"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(proc.stdout[-2000:])
    assert "SHARDED OK" in proc.stdout


def _sharded_worker():
    from trainers import sharding

    assert len(jax.devices()) == 8
    config = tiny_config(disc_start=0, lecam_weight=0.001)
    method = kl_vae.KLVAEMethod(config)
    state = method.init_train_state(jax.random.PRNGKey(0))
    batch = _batch()
    rng = jax.random.PRNGKey(5)
    ref_state, ref_metrics = jax.jit(method.train_step)(state, batch, rng)

    mesh = sharding.make_mesh({"data": 4, "fsdp": 1, "tensor": 2})
    shardings = method.train_state_shardings(jax.eval_shape(lambda: state), mesh)
    sharded = jax.device_put(state, shardings)
    assert any(not s.sharding.is_fully_replicated for s in jax.tree.leaves(sharded["params"]))
    batch_sh = {k: sharding.batch_sharding(mesh, v.ndim) for k, v in batch.items()}

    def step(state, batch, rng):
        with sharding.use_mesh(mesh):
            return method.train_step(state, batch, rng)

    p_step = jax.jit(step, in_shardings=(shardings, batch_sh, sharding.replicated(mesh)),
                     out_shardings=(shardings, sharding.replicated(mesh)))
    new_state, metrics = p_step(sharded, jax.device_put(batch, batch_sh), rng)
    for k in ref_metrics:
        np.testing.assert_allclose(metrics[k], ref_metrics[k], rtol=2e-4, atol=1e-5, err_msg=k)
    def rel(a, b):  # Adam's second moments reach ~1e4 here: compare relative to each leaf's scale
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return float(np.abs(a - b).max() / max(1.0, np.abs(b).max()))

    diffs = sorted(((jax.tree_util.keystr(p), d) for p, d in
                    jax.tree_util.tree_leaves_with_path(jax.tree.map(rel, new_state, ref_state))), key=lambda kv: -kv[1])
    print("largest differences:", diffs[:5])
    # The attention key bias shifts every logit of a query equally, so softmax ignores it: its true
    # gradient is 0 and Adam turns the rounding noise into a step of about lr. Bound those by 2 lr.
    key_bias = [(p, d) for p, d in diffs if p.startswith("['params']") and "['k']['bias']" in p]
    assert key_bias and all(d <= 2 * config.optim.lr for _, d in key_bias), key_bias
    path, worst = next((p, d) for p, d in diffs if (p, d) not in key_bias)
    print(f"max relative |sharded - single| over the new state: {worst:.2e} at {path}")
    assert worst < 1e-4, (worst, path)
    print("SHARDED OK")


if __name__ == "__main__" and sys.argv[1:] == ["sharded-worker"]:
    _sharded_worker()
