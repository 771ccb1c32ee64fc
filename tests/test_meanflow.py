"""MeanFlow and SplitMeanFlow: golden parity, sizes, both identities on a toy field with a closed-form
average velocity, the JVP against finite differences, samplers, the two-stage conversion, sharding."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import meanflow_common
from models import dit, meanflow, splitmeanflow
from tests.conftest import REPO, _tiny_run, run_python
from trainers import config_validation, convert
from trainers.method import ModelDef, get_method

GOLDEN = REPO.parent / "shared" / "golden"
SIZE_FILES = {"B/4": "b4", "B/2": "b2", "M/2": "m2", "L/2": "l2", "XL/2": "xl2"}


def config_of(method: str, size: str = "B/4", arg=None):
    import importlib

    return importlib.import_module(f"configs.{method}_{SIZE_FILES[size]}").get_config(arg)


def tiny_config(method: str, **overrides):
    """16x16x1 pixels, patch 4, width 32, 2 blocks (the loop tests' tiny model)."""
    c = config_of(method, "B/4", "demo")
    c.model.update(input_size=16, patch_size=4, hidden_size=32, depth=2, num_heads=2)
    return _tiny_run(c, overrides)


# ----------------------------------------------------------------------------- golden fixture
def test_golden_fixture_through_converter():
    assert convert.check(GOLDEN / "meanflow.npz")


def test_importer_reads_upstream_params_and_checks_depth():
    _, params, _, inputs, outputs = convert.load_fixture(GOLDEN / "meanflow.npz")
    config = config_of("meanflow")
    config.model.update(input_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=4, num_classes=10)
    model = meanflow.load_params(meanflow.build_network(config.model, nnx.Rngs(0)),
                                 meanflow.IMPORTERS["meanflow"](params, config))
    u = model(jnp.asarray(inputs["u_z"]), jnp.asarray(inputs["u_t"]), jnp.asarray(inputs["u_h"]),
              jnp.asarray(inputs["u_y"], jnp.int32))
    np.testing.assert_allclose(u, outputs["u"], atol=1e-4 * max(1.0, np.abs(outputs["u"]).max()))
    config.model.depth = 3
    with pytest.raises(ValueError, match="blocks"):
        meanflow.IMPORTERS["meanflow"](params, config)


def test_checkpoint_reader_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="Gsunshine/meanflow"):
        meanflow.load_state_dict(str(tmp_path / "checkpoint_1"))


def test_checkpoint_reader_takes_ema_params_of_a_flax_msgpack(tmp_path):
    from flax import serialization

    tree = {"params": {"net": {"a": {"kernel": np.zeros((2, 2), np.float32)}}},
            "ema_params": {"net": {"a": {"kernel": np.ones((2, 2), np.float32)}}}, "step": np.int32(3)}
    (tmp_path / "checkpoint_3").write_bytes(serialization.msgpack_serialize(tree))
    flat = meanflow.load_state_dict(str(tmp_path / "checkpoint_3"))
    assert list(flat) == ["net.a.kernel"] and flat["net.a.kernel"].sum() == 4


# ----------------------------------------------------------------------------- sizes, configs
@pytest.mark.parametrize("method,size", [("meanflow", s) for s in meanflow_common.SIZES] + [("splitmeanflow", "B/4")])
def test_parameter_counts_match_meanflow_table(method, size):
    """SplitMeanFlow builds the same network (its configs share meanflow_common), so one size suffices."""
    config = config_of(method, size)
    get_method(config).validate_config(config)
    model = nnx.eval_shape(lambda: get_method(config).create_model(nnx.Rngs(0)))
    count = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    paper = meanflow_common.PAPER_PARAMS_M[size]
    assert abs(count / 1e6 - paper) / paper < 0.02, count
    assert config.optim.b2 == 0.95 and config.optim.lr == 1e-4 and config.batch_size == 256
    assert config.tokenizer.kind == "sd_vae" and config.tokenizer.scale == 0.18215 and config.ema_rate == 0.9999


def test_config_mistakes_fail_before_compilation():
    c = tiny_config("splitmeanflow")
    c.model.flow_ratio = 1.5
    with pytest.raises(config_validation.ConfigError, match="config.model.flow_ratio"):
        config_validation.validate(c, check_data=False)
    c = tiny_config("meanflow")
    c.model.t_end = 2.0
    with pytest.raises(config_validation.ConfigError, match="t_start"):
        config_validation.validate(c, check_data=False)
    c = config_of("splitmeanflow", "B/4", "two_stage")
    c.optim.weight_decay = 0.1
    with pytest.raises(config_validation.ConfigError, match="weight_decay"):
        config_validation.validate(c, check_data=False)


# ----------------------------------------------------------------------------- toy field
# Data x ~ N(mu, sigma^2 I), z_t = (1 - t) x + t e. The marginal flow is affine:
# Phi_{t->r}(z) = m(r) + s(r)/s(t) (z - m(t)), m(t) = (1 - t) mu, s(t)^2 = (1 - t)^2 sigma^2 + t^2,
# so u(z, r, t) = (z - Phi_{t->r}(z)) / (t - r) = -mu + (1 - s(r)/s(t)) / (t - r) (z - m(t)),
# and v(z, t) = -mu + s'(t)/s(t) (z - m(t)).
MU, SIGMA = 0.7, 0.5


def _s(t, sigma):
    return jnp.sqrt((1 - t) ** 2 * sigma ** 2 + t ** 2)


def exact_u(sigma):
    def u(z, t, h, y):
        t, h = t.reshape(-1, 1, 1, 1), h.reshape(-1, 1, 1, 1)
        r = t - h
        st = _s(t, sigma)
        ds = (t - (1 - t) * sigma ** 2) / st
        safe_h = jnp.where(h > 1e-6, h, 1.0)
        slope = jnp.where(h > 1e-6, (1 - _s(r, sigma) / st) / safe_h, ds / st)
        return -MU + slope * (z - (1 - t) * MU)
    return u


def flow(z, t, r, sigma):
    return (1 - r) * MU + _s(r, sigma) / _s(t, sigma) * (z - (1 - t) * MU)


TOY_SHAPE = (8, 4, 4, 2)


def toy_draws(seed=0):
    k = jax.random.split(jax.random.PRNGKey(seed), 5)
    return {"t_draw": jax.random.normal(k[0], (8, 1, 1, 1)), "r_draw": jax.random.normal(k[1], (8, 1, 1, 1)),
            "noise": jax.random.normal(k[2], TOY_SHAPE), "drop_u": jnp.ones((8,))}


def toy_method(name, **model):
    c = tiny_config(name)
    c.model.update(guidance="none", class_dropout_prob=0.0, **model)
    return get_method(c)


def test_closed_form_satisfies_both_identities():
    u, sigma = exact_u(SIGMA), SIGMA
    z = jax.random.normal(jax.random.PRNGKey(1), TOY_SHAPE)
    t, r = jnp.full((8,), 0.9), jnp.linspace(0.05, 0.6, 8)
    lam = jnp.linspace(0.1, 0.9, 8)
    s = (1 - lam) * t + lam * r
    bc = lambda a: a.reshape(-1, 1, 1, 1)  # noqa: E731
    # Interval splitting: (t - r) u(z_t, r, t) = (s - r) u(z_s, r, s) + (t - s) u(z_t, s, t).
    z_s = flow(z, bc(t), bc(s), sigma)
    lhs = bc(t - r) * u(z, t, t - r, None)
    rhs = bc(s - r) * u(z_s, s, s - r, None) + bc(t - s) * u(z, t, t - s, None)
    np.testing.assert_allclose(lhs, rhs, atol=1e-5)
    # MeanFlow: u = v - (t - r) d/dt u along the marginal velocity.
    v = u(z, t, jnp.zeros(8), None)
    _, du_dt = jax.jvp(lambda z, t, r: u(z, t, t - r, None), (z, t, r), (v, jnp.ones(8), jnp.zeros(8)))
    np.testing.assert_allclose(u(z, t, t - r, None), v - bc(t - r) * du_dt, atol=1e-5)


def test_meanflow_target_is_exact_for_the_true_field_and_jvp_matches_finite_differences():
    # A point mass (sigma -> 0) makes the conditional velocity e - x the marginal one, so the
    # objective's own u_tgt must equal the exact u.
    method = toy_method("meanflow", data_proportion=0.25)
    x = jnp.full(TOY_SHAPE, MU)
    d = toy_draws()
    _, terms = method.objective(exact_u(0.0), x, jnp.zeros(8, jnp.int32), **d)
    assert float(jnp.max(terms["r"] - terms["t"])) <= 0 and int(jnp.sum(terms["r"] < terms["t"])) == 6
    np.testing.assert_allclose(terms["u_tgt"], terms["u"], atol=2e-5)
    assert float(terms["loss"]) < 1e-6
    # Gaussian data: the JVP du/dt along (v, 1, 0) equals a central finite difference.
    x = MU + SIGMA * jax.random.normal(jax.random.PRNGKey(4), TOY_SHAPE)
    u = exact_u(SIGMA)
    _, terms = method.objective(u, x, jnp.zeros(8, jnp.int32), **d)
    t, r, z, v = (terms[k] for k in ("t", "r", "z_t", "v_g"))
    delta = 1e-2

    def along(e):
        return u(z + e * v, (t + e).reshape(-1), (t + e - r).reshape(-1), None)

    fd = (along(delta) - along(-delta)) / (2 * delta)
    # Rows with r < t (the first 2 have r = t, where the closed form's h -> 0 limit is not smooth in h).
    np.testing.assert_allclose(terms["du_dt"][2:], fd[2:], rtol=2e-3, atol=2e-3)
    assert float(jnp.max(jnp.abs(terms["du_dt"][2:]))) > 0.1


def test_splitmeanflow_target_is_exact_for_the_true_field():
    """For the exact u the split target (two no-grad evaluations, z_s from the model's own step) equals
    u(z_t, r, t) for any data, and the boundary rows regress the conditional velocity e - x."""
    method = toy_method("splitmeanflow", flow_ratio=0.25)
    x = MU + SIGMA * jax.random.normal(jax.random.PRNGKey(4), TOY_SHAPE)
    lam_u = jnp.linspace(0.05, 0.95, 8)
    _, terms = method.objective(exact_u(SIGMA), x, jnp.zeros(8, jnp.int32), **toy_draws(), lam_u=lam_u)
    n_b = 2
    np.testing.assert_allclose(terms["u_tgt"][n_b:], terms["u"][n_b:], atol=2e-5)
    assert float(jnp.max(terms["split_sq"])) < 1e-7
    np.testing.assert_allclose(terms["u_tgt"][:n_b], terms["v"][:n_b], atol=1e-6)
    np.testing.assert_array_equal(terms["t"][:n_b], terms["r"][:n_b])
    s = terms["s"].reshape(-1)
    t, r = terms["t"][n_b:].reshape(-1), terms["r"][n_b:].reshape(-1)
    np.testing.assert_allclose(s, (1 - lam_u[n_b:]) * t + lam_u[n_b:] * r, atol=1e-6)


@pytest.mark.parametrize("name", ["meanflow", "splitmeanflow"])
def test_k_step_sampler_is_consistent_for_the_true_field(name):
    """With the exact average velocity, 1, 2 and 4 steps land on the same z_0 = Phi_{1->0}(z_1)."""
    method = toy_method(name)
    u = exact_u(SIGMA)
    method.config.model.update(input_size=4, in_channels=2)
    labels = jnp.zeros(8, jnp.int32)
    z1 = jax.random.normal(jax.random.PRNGKey(7), TOY_SHAPE)
    want = flow(z1, 1.0, 0.0, SIGMA)
    for k in (1, 2, 4):
        np.testing.assert_allclose(method.sample(u, jax.random.PRNGKey(7), labels, num_steps=k), want, atol=1e-5)


# ----------------------------------------------------------------------------- networks, guidance, two-stage
def perturb(model, seed):
    """Non-zero adaLN / final layers (zero-initialised), so that outputs depend on every input."""
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    rng = np.random.default_rng(seed)
    nnx.update(model, jax.tree.unflatten(treedef, [
        l + jnp.asarray(0.05 * rng.standard_normal(l.shape), l.dtype) for l in leaves]))
    return model


@pytest.fixture(scope="module")
def tiny_models():
    out = {}
    for name in ("meanflow", "splitmeanflow"):
        config = tiny_config(name)
        method = get_method(config)
        model = method.create_model(nnx.Rngs(0))
        perturb(model, 1)
        out[name] = (config, method, model)
    return out


def test_every_parameter_has_logical_axis_names():
    for name in ("meanflow", "splitmeanflow"):
        names = jax.tree.leaves(ModelDef(get_method(tiny_config(name))).param_names(),
                                is_leaf=lambda x: isinstance(x, tuple) or x is None)
        assert names and all(isinstance(n, tuple) for n in names)


@pytest.mark.parametrize("name", ["meanflow", "splitmeanflow"])
def test_loss_has_gradients_and_the_h_embedder_matters(tiny_models, name):
    config, method, model = tiny_models[name]
    batch = {"image": jax.random.uniform(jax.random.PRNGKey(0), (8, 16, 16, 1), minval=-1, maxval=1),
             "label": jnp.arange(8, dtype=jnp.int32) % 10}
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def f(p):
        return method.loss(nnx.merge(graphdef, p, rest), batch, jax.random.PRNGKey(3))

    (loss, metrics), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(params)
    assert np.isfinite(float(loss)) and float(loss) > 0
    if config.model.norm_p == 1.0:  # adaptive weight: every per-sample term sq / (sq + c) is below 1
        assert float(loss) < 1.0
    norms = {k: float(optax_norm(v)) for k, v in nnx.to_pure_dict(grads).items()}
    assert norms["h_embedder"] > 0 and norms["blocks"] > 0, norms
    z = batch["image"][:2]
    t = jnp.array([0.7, 0.7])
    y = jnp.array([1, 2])
    assert not np.allclose(model(z, t, jnp.zeros(2), y), model(z, t, jnp.full(2, 0.5), y))


def optax_norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def test_guidance_folding_omega_kappa_interval():
    m = tiny_config("meanflow").model
    m.update(omega=0.2, kappa=0.92, t_start=0.0, t_end=0.75)
    v = jnp.ones((2, 2, 2, 1))
    vals = {"cond": 3.0, "null": 5.0}

    def v_fn(z, t, y):
        return jnp.where((y == m.num_classes)[:, None, None, None], vals["null"], vals["cond"]) * jnp.ones_like(z)

    t = jnp.array([0.5, 0.9]).reshape(2, 1, 1, 1)
    out = meanflow.guidance_terms(v_fn, v, v, t, jnp.array([1, 2]), m)
    want_in = 0.2 * 1 + 0.92 * 3 + (1 - 0.2 - 0.92) * 5
    np.testing.assert_allclose(out["v_g_guided"][0], want_in, rtol=1e-6)
    np.testing.assert_allclose(out["v_g_guided"][1], 1.0, rtol=1e-6)  # outside [t_start, t_end]: plain v


def test_two_stage_student_starts_equal_to_the_flow_matching_teacher():
    """SiT DiT (t = 0 noise) -> MeanFlow DiT: u(z, t, h = 0, y) = -v_SiT(z, 1 - t, y), h embedder zero;
    the frozen teacher gets no gradient."""
    from tests.conftest import tiny_dit_config

    dc = tiny_dit_config()
    dc.model.learn_sigma = True  # the sigma half is dropped
    teacher = perturb(dit.build_network(dc.model, nnx.Rngs(2)), 3)
    config = tiny_config("splitmeanflow", **{"model.boundary_target": "teacher"})
    config.optim.weight_decay = 0.0
    method = get_method(config)
    model = method.create_model(nnx.Rngs(0))
    meanflow.load_params(model, splitmeanflow.two_stage_params(
        nnx.to_pure_dict(nnx.state(teacher, nnx.Param)), config.model))
    z = jax.random.normal(jax.random.PRNGKey(5), (4, 16, 16, 1))
    t = jnp.array([0.0, 0.3, 0.8, 1.0])
    y = jnp.array([0, 3, 7, 10])
    call = nnx.jit(lambda m, *a: m(*a))
    want = -call(teacher, z, 1 - t, y)[..., :1]
    np.testing.assert_allclose(call(model, z, t, jnp.zeros(4), y), want, atol=2e-5)
    np.testing.assert_allclose(call(model, z, t, jnp.full(4, 0.6), y), want, atol=2e-5)  # zero h embedder
    np.testing.assert_allclose(call(model.teacher, z, t, jnp.zeros(4), y), want, atol=2e-5)
    batch = {"image": z, "label": jnp.array([0, 3, 7, 1])}
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    grads = jax.jit(jax.grad(lambda p: method.loss(nnx.merge(graphdef, p, rest), batch, jax.random.PRNGKey(0))[0]))(params)
    g = nnx.to_pure_dict(grads)
    assert float(optax_norm(g["teacher"])) == 0.0 and float(optax_norm(g["student"])) > 0


# ----------------------------------------------------------------------------- sharding, training
SHARDED_DRIVER = """
import sys
sys.path.insert(0, {repo!r})
import tests.sharded_equivalence as se
from tests.test_meanflow import tiny_config
se.tiny_dit_config = lambda **kw: tiny_config({name!r}, **kw)  # the driver's model factory
se.main({root!r}, "dit")
"""


@pytest.mark.slow
@pytest.mark.parametrize("name", ["meanflow", "splitmeanflow"])
def test_sharded_mesh_matches_one_device(tmp_path, name):
    """8 simulated devices, mesh (data=2, fsdp=2, tensor=2) vs one device, five train steps: the JVP
    (MeanFlow) and the split evaluations on row slices (SplitMeanFlow) shard like the rest."""
    proc = run_python(["-c", SHARDED_DRIVER.format(repo=str(REPO), name=name, root=str(tmp_path))],
                      env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    report = json.loads(proc.stdout.split("REPORT ", 1)[1].splitlines()[0])
    np.testing.assert_allclose(report["losses_sharded"], report["losses_single"], rtol=1e-5)
    assert len(report["losses_sharded"]) == 5
    assert report["max_param_rel_diff"] <= 1e-5, report
    assert report["wrong_specs"] == [], report


@pytest.mark.slow
@pytest.mark.parametrize("name", ["meanflow", "splitmeanflow"])
def test_demo_trains_through_trainers_main(tmp_path, name):
    """The demo config through the CLI: loss falls, samples come out finite, scores are written."""
    run_python(["-m", "trainers.main", f"--config=configs/{name}_b4.py:demo", f"--workdir={tmp_path}",
                "--config.num_steps=30", "--config.optim.warmup_steps=5", "--config.log_every=10",
                "--config.checkpoint_every=30", "--config.eval.num_samples=64", "--config.num_grid_samples=10",
                "--config.model.hidden_size=32", "--config.model.depth=2", "--config.model.num_heads=2",
                "--config.batch_size=16"])
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(np.isfinite(r["loss"]) for r in rows)
    assert rows[-1]["v_loss"] < rows[0]["v_loss"], rows
    scores = json.loads((tmp_path / "scores.jsonl").read_text().splitlines()[-1])
    assert np.isfinite(scores["mnist_fid"])
