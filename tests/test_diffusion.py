"""DiT's Gaussian diffusion (models/diffusion.py): golden parity through the converter, respacing rules,
the hybrid loss's stop-gradient, and the samplers' fixed points with an exact denoiser."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import diffusion
from tests.conftest import tiny_dit_config
from trainers import convert
from trainers.method import get_method


def test_golden_fixture_through_converter(golden):
    assert convert.check(golden / "dit_diffusion.npz")


@pytest.mark.parametrize("key", ["out/vb", "out/cfg_sample", "out/ddim_eta1_sample", "out/resp_timestep_map"])
def test_a_wrong_reference_fails(golden, tmp_path, key):
    data = dict(np.load(golden / "dit_diffusion.npz"))
    data[key] = data[key] + (1 if data[key].dtype.kind == "i" else 1e-2)
    np.savez(tmp_path / "dit_diffusion.npz", **data)
    (tmp_path / "dit_diffusion.json").write_text((golden / "dit_diffusion.json").read_text())
    assert not convert.check(tmp_path / "dit_diffusion.npz", verbose=False)


def test_respacing_rules():
    assert sorted(diffusion.space_timesteps(1000, "ddim50")) == list(range(0, 1000, 20))
    # round half to even on the accumulated index: 41.625 * 4 = 166.5 -> 166
    assert 166 in diffusion.space_timesteps(1000, "25") and 167 not in diffusion.space_timesteps(1000, "25")
    assert len(diffusion.space_timesteps(1000, "250")) == 250
    with pytest.raises(ValueError, match="ddim999"):
        diffusion.space_timesteps(1000, "ddim999")
    with pytest.raises(ValueError, match="cannot divide"):
        diffusion.space_timesteps(10, "6,6")
    full = diffusion.create_diffusion("")
    resp = diffusion.create_diffusion("10")
    # respaced betas keep the cumulative alphas of the kept steps
    np.testing.assert_allclose(resp.alphas_cumprod, full.alphas_cumprod[resp.timestep_map], rtol=1e-12)


def test_vlb_trains_only_the_variance_and_mse_only_eps():
    d = diffusion.create_diffusion("")
    x0 = jax.random.uniform(jax.random.PRNGKey(0), (3, 4, 4, 2), minval=-1, maxval=1)
    noise = jax.random.normal(jax.random.PRNGKey(1), x0.shape)
    t = jnp.array([0, 10, 999])
    out = 0.3 * jax.random.normal(jax.random.PRNGKey(2), (3, 4, 4, 4))
    g_vb = jax.grad(lambda o: d.training_losses(None, x0, t, noise, model_output=o)["vb"].sum())(out)
    g_mse = jax.grad(lambda o: d.training_losses(None, x0, t, noise, model_output=o)["mse"].sum())(out)
    assert float(jnp.abs(g_vb[..., :2]).max()) == 0.0 and float(jnp.abs(g_vb[..., 2:]).max()) > 0
    assert float(jnp.abs(g_mse[..., 2:]).max()) == 0.0 and float(jnp.abs(g_mse[..., :2]).max()) > 0


def _oracle(d_full, x_data):
    """The exact eps of a point mass at x_data, with v = -1 (posterior variance), for original timesteps."""
    def model_fn(x, t):
        abar = jnp.asarray(d_full.alphas_cumprod, jnp.float32)[t][:, None, None, None]
        eps = (x - jnp.sqrt(abar) * x_data) / jnp.sqrt(1 - abar)
        return jnp.concatenate([eps, -jnp.ones_like(eps)], -1)
    return model_fn


@pytest.mark.parametrize("respacing,sampler", [("20", "p_sample_loop"), ("ddim10", "ddim_sample_loop")])
def test_samplers_reach_a_point_mass_with_its_exact_denoiser(respacing, sampler):
    x_data = jnp.linspace(-0.8, 0.8, 2 * 4 * 4 * 1).reshape(2, 4, 4, 1)
    d = diffusion.create_diffusion(respacing)
    x_T = jax.random.normal(jax.random.PRNGKey(0), x_data.shape)
    out = getattr(d, sampler)(_oracle(diffusion.create_diffusion(""), x_data), jax.random.PRNGKey(1), x_T)
    np.testing.assert_allclose(out, x_data, atol=2e-3)


def test_flow_samplers_transport_noise_to_a_gaussian_with_its_exact_velocity():
    """Data N(m, s^2) per entry: the linear path's exact velocity is affine in x, the ODE map is
    x -> m + s x, and the SDE's samples have mean m and std s."""
    from models import dit

    m, s = 0.5, 0.3

    def velocity(x, t):
        t = t[:, None, None, None]
        var = t ** 2 * s ** 2 + (1 - t) ** 2
        return m + (t * s ** 2 - (1 - t)) / var * (x - t * m)

    x0 = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 1))
    np.testing.assert_allclose(dit.sit_ode_sample(velocity, x0, method="dopri5"), m + s * x0, atol=2e-3)
    np.testing.assert_allclose(dit.sit_ode_sample(velocity, x0, method="heun", num_steps=30), m + s * x0,
                               atol=1e-2)
    x0 = jax.random.normal(jax.random.PRNGKey(1), (16, 16, 16, 1))
    sde = dit.sit_sde_sample(velocity, jax.random.PRNGKey(2), x0, num_steps=100)
    assert abs(float(sde.mean()) - m) < 0.02 and abs(float(sde.std()) - s) < 0.02


@pytest.fixture(scope="module")
def tiny_ddpm():
    config = tiny_dit_config(**{"model.learn_sigma": True, "sample.method": "ddpm"})
    method = get_method(config)
    method.validate_config(config)
    model = method.create_model(nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    nnx.update(model, jax.tree.unflatten(treedef, [l + 0.05 * jax.random.normal(k, l.shape)
                                                   for l, k in zip(leaves, keys)]))
    return config, method, model


def test_ddpm_objective_is_the_hybrid_loss(tiny_ddpm):
    config, method, model = tiny_ddpm
    assert config.model.objective == "ddpm"
    batch = {"image": jax.random.uniform(jax.random.PRNGKey(0), (4, 16, 16, 1), minval=-1, maxval=1),
             "label": jnp.arange(4, dtype=jnp.int32)}
    loss, metrics = method.loss(model, batch, jax.random.PRNGKey(3))
    rng_t, rng_noise, rng_drop = jax.random.split(jax.random.PRNGKey(3), 3)
    labels = model.y_embedder.drop_labels(batch["label"], rng_drop)
    noise = jax.random.normal(rng_noise, batch["image"].shape)
    t = jax.random.randint(rng_t, (4,), 0, 1000)
    d = diffusion.create_diffusion("")
    terms = d.training_losses(lambda x, tt: model(x, tt, labels), batch["image"], t, noise)
    np.testing.assert_allclose(loss, jnp.mean(terms["mse"] + terms["vb"]), rtol=1e-6)
    assert float(metrics["vb"]) > 0


def test_ddpm_sampler_is_the_p_sample_loop_with_guidance(tiny_ddpm):
    config, method, model = tiny_ddpm
    labels = jnp.array([1, 2], jnp.int32)
    rng = jax.random.PRNGKey(5)
    ours = method.sample(model, rng, labels, num_steps=3, cfg_scale=2.0, method="ddpm")
    rng_init, rng_loop = jax.random.split(rng)
    z = jax.random.normal(rng_init, ours.shape)
    y = jnp.concatenate([labels, jnp.full_like(labels, 10)])
    net = diffusion.classifier_free_guidance(lambda x, t: model(x, t, y), 2.0, 1)
    d = diffusion.create_diffusion("3")
    x = jnp.concatenate([z, z])
    for i, key in zip([2, 1, 0], jax.random.split(rng_loop, 3)):
        x = d.p_sample(net, x, jnp.full((4,), i), jax.random.normal(key, x.shape),
                       clip_denoised=config.sample.clip_denoised)["sample"]
    np.testing.assert_allclose(ours, x[:2], atol=1e-4)
    ddim = method.sample(model, rng, labels, num_steps=3, cfg_scale=1.0, method="ddim")
    assert ddim.shape == ours.shape and np.all(np.isfinite(np.asarray(ddim)))
