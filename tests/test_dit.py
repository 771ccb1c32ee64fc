"""DiT: golden parity through the converter, paper parameter counts, the SiT (flow) objective and samplers,
import of DiT/SiT checkpoints with the objective check. DiT's diffusion itself: tests/test_diffusion.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import dit_b, dit_l, dit_s, dit_xl
from tests.conftest import tiny_dit_config
from trainers import convert
from trainers.method import ModelDef, get_method


def test_golden_fixture_through_converter(golden):
    assert convert.check(golden / "dit.npz")


def test_convert_check_command_exits_nonzero_on_a_wrong_port(golden, tmp_path, monkeypatch):
    """The checker really compares: a perturbed reference output fails."""
    data = dict(np.load(golden / "dit.npz"))
    data["out/forward"] = data["out/forward"] + 1e-2
    np.savez(tmp_path / "dit.npz", **data)
    (tmp_path / "dit.json").write_text((golden / "dit.json").read_text())
    assert not convert.check(tmp_path / "dit.npz", verbose=False)


# DiT paper Table 4 (Gflops/params table): S 33M, B 130M, L 458M, XL 675M.
PAPER_PARAMS_M = {"S": 33.0, "B": 130.0, "L": 458.0, "XL": 675.0}


@pytest.mark.parametrize("size,module", [("S", dit_s), ("B", dit_b), ("L", dit_l), ("XL", dit_xl)])
@pytest.mark.parametrize("patch", ["p2", "p4", "p8"])
def test_parameter_counts_match_the_paper(size, module, patch):
    config = module.get_config(patch)
    model = nnx.eval_shape(lambda: get_method(config).create_model(nnx.Rngs(0)))
    count = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert abs(count / 1e6 - PAPER_PARAMS_M[size]) / PAPER_PARAMS_M[size] < 0.02, count


def test_every_parameter_has_logical_axis_names():
    model_def = ModelDef(get_method(tiny_dit_config()))
    names = jax.tree.leaves(model_def.param_names(), is_leaf=lambda x: isinstance(x, tuple) or x is None)
    assert names and all(isinstance(n, tuple) for n in names)


def test_model_shapes_run_no_initialiser_inside_ensure_compile_time_eval(monkeypatch):
    """A tokenizer's weights are read inside the traced init of a train state, under
    ``jax.ensure_compile_time_eval``; the shapes built there (``layers.abstract_module``, what ModelDef
    uses) run no random initialiser. With a constant key every initialiser ran eagerly, one XLA compile
    per parameter shape (a MaskGIT-VQGAN teacher: 6.6 s)."""
    from jax import monitoring

    from models import layers

    compiles = []

    def listen(name, secs, **kw):
        if name.endswith("backend_compile_duration"):
            compiles.append(name)

    def kernels(rngs, width):  # random-initialised kernels of shapes new to this process
        return [layers.dense(3 + i, width, ("embed", "mlp"), rngs=rngs, use_bias=False) for i in range(3)]

    jax.random.key(0)
    monitoring.register_event_duration_secs_listener(listen)
    try:
        with jax.ensure_compile_time_eval():
            layers.abstract_module(lambda rngs: kernels(rngs, 17))  # scalar key ops compile once per process
            compiles.clear()
            abstract = layers.abstract_module(lambda rngs: kernels(rngs, 19))
            assert compiles == []
            nnx.eval_shape(lambda: kernels(nnx.Rngs(0), 23))  # the constant-key form
            assert len(compiles) >= 3
    finally:
        monitoring.unregister_event_duration_listener(listen)
    assert [m.kernel.get_value().shape for m in abstract] == [(3, 19), (4, 19), (5, 19)]

    built = []
    monkeypatch.setattr(layers, "abstract_module", lambda build: built.append(build) or nnx.eval_shape(
        lambda key: build(nnx.Rngs(key)), jax.random.key(0)))
    ModelDef(get_method(tiny_dit_config()))
    assert len(built) == 1


@pytest.fixture(scope="module")
def tiny():
    """The tiny DiT with SiT's flow objective (velocity tests)."""
    config = tiny_dit_config(**{"model.objective": "flow", "model.learn_sigma": False, "sample.method": "euler"})
    method = get_method(config)
    model = method.create_model(nnx.Rngs(0))
    # Non-zero adaLN/final layers so that the network output depends on its inputs.
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    nnx.update(model, jax.tree.unflatten(treedef, [l + 0.05 * jax.random.normal(k, l.shape)
                                                   for l, k in zip(leaves, keys)]))
    return config, method, model


def test_loss_is_velocity_regression(tiny):
    config, method, model = tiny
    batch = {"image": jax.random.uniform(jax.random.PRNGKey(0), (4, 16, 16, 1), minval=-1, maxval=1),
             "label": jnp.arange(4, dtype=jnp.int32)}
    loss, metrics = method.loss(model, batch, jax.random.PRNGKey(3))
    # Recompute by hand with the same draws (t, noise, label drop use split(rng, 3)).
    rng_t, rng_noise, rng_drop = jax.random.split(jax.random.PRNGKey(3), 3)
    t = jax.random.uniform(rng_t, (4,))
    noise = jax.random.normal(rng_noise, batch["image"].shape)
    x_t = t[:, None, None, None] * batch["image"] + (1 - t[:, None, None, None]) * noise
    labels = model.y_embedder.drop_labels(batch["label"], rng_drop)
    v = model(x_t, t, labels)[..., :1]
    np.testing.assert_allclose(loss, jnp.mean((v - (batch["image"] - noise)) ** 2), rtol=1e-6)
    assert float(metrics["loss"]) == float(loss)


def test_guidance_scale_one_equals_no_guidance_and_null_class_matters(tiny):
    config, method, model = tiny
    labels = jnp.array([1, 2], jnp.int32)
    rng = jax.random.PRNGKey(5)
    plain = method.sample(model, rng, labels, num_steps=4, cfg_scale=1.0, method="euler")
    x0 = jax.random.normal(jax.random.split(rng)[0], plain.shape)
    # By hand: SiT's step semantics, linspace(0, 1, num_steps) -> num_steps - 1 = 3 Euler steps.
    x = x0
    ts = np.linspace(0, 1, 4)
    for i in range(3):
        x = x + (ts[i + 1] - ts[i]) * method.velocity(model, x, jnp.full((2,), ts[i]), labels)
    np.testing.assert_allclose(plain, x, atol=1e-5)
    guided = method.sample(model, rng, labels, num_steps=4, cfg_scale=3.0, method="euler")
    assert float(jnp.max(jnp.abs(guided - plain))) > 1e-4


def test_heun_is_second_order_on_a_linear_field(tiny):
    """Heun integrates dx/dt = v(x, t) more accurately than Euler at equal steps."""
    config, method, model = tiny
    labels = jnp.array([0, 3], jnp.int32)
    rng = jax.random.PRNGKey(2)
    fine = method.sample(model, rng, labels, cfg_scale=1.0, method="dopri5")  # adaptive, atol 1e-6
    euler = method.sample(model, rng, labels, num_steps=5, cfg_scale=1.0, method="euler")
    heun = method.sample(model, rng, labels, num_steps=5, cfg_scale=1.0, method="heun")
    assert float(jnp.abs(heun - fine).max()) < float(jnp.abs(euler - fine).max())


def test_sampling_is_deterministic_for_a_seed(tiny):
    config, method, model = tiny
    labels = jnp.array([0, 1], jnp.int32)
    a = method.sample(model, jax.random.PRNGKey(9), labels, num_steps=2)
    b = method.sample(model, jax.random.PRNGKey(9), labels, num_steps=2)
    np.testing.assert_array_equal(a, b)


def test_import_an_upstream_checkpoint_then_sample_from_it(golden, tmp_path):
    """A DiT state_dict saved by torch -> `convert import dit` -> orbax workdir -> trainers.sample."""
    import torch

    from tests.conftest import run_python

    data = np.load(golden / "dit.npz")
    state_dict = {k[len("param/"):]: torch.from_numpy(data[k]) for k in data.files if k.startswith("param/")}
    torch.save(state_dict, tmp_path / "DiT-tiny.pt")
    meta = __import__("json").loads((golden / "dit.json").read_text())["constructor"]
    overrides = [f"--config.model.{k}={v}" for k, v in meta.items()
                 if k in ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads")]
    workdir = tmp_path / "imported"
    run_python(["-m", "trainers.convert", "import", "dit", str(tmp_path / "DiT-tiny.pt"), f"--out={workdir}",
                "--config=configs/dit_s.py:p2", *overrides, "--config.data.name=mnist_embedded"])
    # Sample the imported DDPM latents in-process (decoding them needs the SD-VAE weights, absent here).
    from trainers import checkpoint, sharding
    from trainers.sample import load_params
    from trainers.train import Sampler

    config = checkpoint.read_config(workdir)
    assert config.model.objective == "ddpm"
    config.sample.num_steps, config.sample.cfg_scale = 2, 1.5
    mesh = sharding.make_mesh(config.mesh)
    method, model_def, step, params, rest = load_params(config, str(workdir), mesh)
    latents = np.asarray(Sampler(method, model_def, mesh)(params, rest, jax.random.PRNGKey(0), np.arange(3)))
    assert latents.shape == (3, 16, 16, 4) and np.all(np.isfinite(latents))
    # The restored EMA params are the converted upstream weights.
    assert step == 0 and config.sample.use_ema
    np.testing.assert_array_equal(np.asarray(params["blocks"][1]["attn"]["qkv"]["kernel"]),
                                  data["param/blocks.1.attn.qkv.weight"].T)


def test_sde_sampler_follows_sit_step_semantics(tiny):
    """sde: num_steps - 1 Euler-Maruyama steps on linspace(0, 0.96, num_steps), then the Mean step to 1."""
    from models import dit

    config, method, model = tiny
    labels = jnp.array([0, 5], jnp.int32)
    rng = jax.random.PRNGKey(4)
    ours = method.sample(model, rng, labels, num_steps=3, cfg_scale=1.0, method="sde")
    rng_init, rng_loop = jax.random.split(rng)
    x = jax.random.normal(rng_init, ours.shape)
    ts = np.linspace(0.0, 0.96, 3)
    keys = jax.random.split(rng_loop, 2)

    def drift(x, t):
        v = method.velocity(model, x, jnp.full((2,), t), labels)
        return v + (1 - t) * (t * v - x) / (1 - t)  # v + w(t) * score, w = sigma_t = 1 - t

    for i in range(2):
        dt = ts[1] - ts[0]
        noise = jax.random.normal(keys[i], x.shape)
        x = x + drift(x, ts[i]) * dt + np.sqrt(2 * (1 - ts[i])) * np.sqrt(dt) * noise
    x = x + drift(x, 0.96) * 0.04
    np.testing.assert_allclose(ours, x, atol=1e-4)
    assert dit.SAMPLERS["flow"] == ("sde", "dopri5", "euler", "heun")


def test_cfg_guides_only_the_first_cfg_channels(tiny):
    """With cfg_channels=1 of 2 channels the second velocity channel stays the conditional one."""
    config, method, model = tiny
    from models import diffusion

    x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 2))
    cond = lambda x, t: jnp.concatenate([x[..., :1] * 0 + 1.0, x[..., 1:] * 0 + 2.0], -1) * jnp.where(
        jnp.arange(x.shape[0]) < x.shape[0] // 2, 1.0, 0.5)[:, None, None, None]
    guided = diffusion.classifier_free_guidance(cond, 3.0, 1)(jnp.concatenate([x, x]), jnp.zeros((4,)))
    # channel 0: 0.5 + 3 (1 - 0.5) = 2 in both halves; channel 1: each half's own (2, then 1)
    np.testing.assert_allclose(guided[..., 0], 2.0)
    np.testing.assert_allclose(guided[:2, ..., 1], 2.0)
    np.testing.assert_allclose(guided[2:, ..., 1], 1.0)


def test_importers_refuse_a_checkpoint_of_the_other_objective(golden):
    from models import dit

    data = np.load(golden / "dit.npz")
    sd = {k[len("param/"):]: data[k] for k in data.files if k.startswith("param/")}
    meta = __import__("json").loads((golden / "dit.json").read_text())["constructor"]
    config = dit_s.get_config("p2")  # objective ddpm
    config.model.update({k: meta[k] for k in ("input_size", "patch_size", "in_channels", "hidden_size", "depth",
                                              "num_heads")})
    with pytest.raises(ValueError, match="objective"):
        dit.IMPORTERS["sit"](sd, config)
    params = dit.IMPORTERS["dit"](sd, config)
    np.testing.assert_array_equal(params["final_layer"]["linear"]["bias"], sd["final_layer.linear.bias"])
    config.model.objective = "flow"
    with pytest.raises(ValueError, match="objective='flow'"):
        dit.IMPORTERS["dit"](sd, config)
    config.model.learn_sigma = False
    with pytest.raises(ValueError, match="learn_sigma"):
        dit.IMPORTERS["sit"](sd, config)


@pytest.mark.parametrize("override,match", [
    ({"model.objective": "score"}, "config.model.objective"),
    ({"model.objective": "flow", "sample.method": "ddpm"}, "config.sample.method"),
    ({"sample.method": "sde"}, "config.sample.method"),
    ({"sample.timestep_respacing": "ddim999"}, "timestep_respacing"),
    ({"sample.cfg_channels": -1}, "cfg_channels"),
])
def test_config_mistakes_fail_before_compilation(override, match):
    config = tiny_dit_config(**override)
    with pytest.raises(ValueError, match=match):
        get_method(config).validate_config(config)
