"""LiT / DyDi-LiT: DyDiLA reduces to LiT's attention, hard routing with router gradients, Pallas path ==
reference (values and gradients), DiT weight inheritance and the distillation loss, configs, sharding."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import diffusion, dit, layers, lit
from tests.conftest import _tiny_run, run_python
from trainers.method import ModelDef, get_method


def tiny_lit_config(attention: str = "dydila", **overrides):
    """A tiny LiT / DyDi-LiT (16x16x1 pixels, patch 4 -> 4x4 grid, width 32, 2 blocks, 2 heads, no teacher)."""
    from configs import dydi_lit_s, lit_s

    c = (dydi_lit_s if attention == "dydila" else lit_s).get_config("demo")
    c.model.update(input_size=16, patch_size=4, hidden_size=32, depth=2, num_heads=2)
    if attention == "dydila":
        c.model.dydila.update(num_projectors=2, num_kernels=3, num_lambdas=3)
    return _tiny_run(c, overrides)


def _x(shape=(2, 16, 32), seed=0):
    return jax.random.normal(jax.random.PRNGKey(seed), shape)


def test_dydila_with_one_projector_power_one_and_lambda_zero_is_lit_attention():
    cfg = lit.DyDiLAConfig(num_projectors=1, num_kernels=1, num_lambdas=1, gamma_init=(1.0, 1.0),
                           lambda_init=(0.0, 0.0), power_eps=1e-9)
    dydila = lit.DyDiLA(32, 2, grid_size=4, cfg=cfg, impl="xla", rngs=nnx.Rngs(0))
    lit_attn = lit.LiTAttention(32, 2, grid_size=4, impl="xla", rngs=nnx.Rngs(1))
    for name in ("qkv", "proj"):  # shared weights; a non-zero DWC so that branch is compared too
        nnx.update(getattr(lit_attn, name), nnx.state(getattr(dydila, name)))
    dydila.dwc.conv.bias[...] = 0.1 * jnp.arange(16.0)
    nnx.update(lit_attn.dwc, nnx.state(dydila.dwc))
    x = _x()
    ours, ref = dydila(x), lit_attn(x)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5)
    # and a real DyDiLA (3 projectors, routed powers, lambda != 0) is not LiT
    full = lit.DyDiLA(32, 2, grid_size=4, impl="xla", rngs=nnx.Rngs(0))
    nnx.update(full.qkv, nnx.state(dydila.qkv))
    assert float(jnp.abs(full(x) - ref).max()) > 1e-3


def test_lit_attention_is_normalised_relu_linear_attention_plus_dwc():
    attn = lit.LiTAttention(32, 2, grid_size=4, impl="xla", rngs=nnx.Rngs(0))
    x = _x()
    q, k, v = layers.split_heads(attn.qkv(x), 3, 2)
    q, k = jax.nn.relu(q), jax.nn.relu(k)
    kv = jnp.einsum("bhnd,bhne->bhde", k, v) / 16
    den = jnp.einsum("bhnd,bhd->bhn", q, k.mean(2))[..., None] + 1e-6
    by_hand = attn.proj(lit._merge_heads(jnp.einsum("bhnd,bhde->bhne", q, kv) / den + attn.dwc(v)))
    np.testing.assert_allclose(attn(x), by_hand, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def dydila():
    return lit.DyDiLA(32, 2, grid_size=4, cfg=lit.DyDiLAConfig(num_projectors=3, num_kernels=4, num_lambdas=4),
                      impl="xla", rngs=nnx.Rngs(3))


def test_routing_is_hard_one_hot_and_every_router_gets_gradients(dydila):
    x = _x(seed=1)
    _, routing = dydila(x, return_routing=True)
    for g in jax.tree.leaves(routing):
        g = np.asarray(g)
        assert set(np.unique(g)) <= {0.0, 1.0} and np.all(g.sum(-1) == 1.0)
    assert len(np.unique(np.asarray(routing["projector_q"]).argmax(-1))) > 1  # tokens route differently

    graphdef, params = nnx.split(dydila, nnx.Param)
    cot = jax.random.normal(jax.random.PRNGKey(2), x.shape)
    grads = jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(x) * cot))(params)
    for name in ("proj_router", "kernel_router", "lambda_router", "proj_bank", "gamma", "lambdas"):
        g = np.asarray(grads[name][...])
        assert np.all(np.isfinite(g)) and np.abs(g).max() > 0, name
        if name in ("proj_router", "kernel_router", "lambda_router"):  # every bank's router
            assert np.all(np.abs(g).reshape(g.shape[0], -1).max(-1) > 0), name


def test_pallas_path_equals_the_reference_values_and_gradients(dydila):
    x = _x(seed=4)
    graphdef, params = nnx.split(dydila, nnx.Param)
    pallas = nnx.merge(graphdef, params)
    pallas.impl = "pallas"  # interpret mode on CPU
    cot = jax.random.normal(jax.random.PRNGKey(5), x.shape)

    def loss(module, x):
        return jnp.sum(module(x) * cot)

    np.testing.assert_allclose(pallas(x), dydila(x), rtol=2e-5, atol=2e-6)
    g_ref = jax.grad(loss, argnums=1)(dydila, x)
    g_pal = jax.grad(loss, argnums=1)(pallas, x)
    np.testing.assert_allclose(g_pal, g_ref, rtol=1e-4, atol=1e-5)


def test_rmsnorm_normaliser_option():
    attn = lit.DyDiLA(32, 2, grid_size=4, cfg=lit.DyDiLAConfig(normaliser="rmsnorm", num_projectors=2),
                      impl="xla", rngs=nnx.Rngs(0))
    out = attn(_x())
    assert out.shape == (2, 16, 32) and np.all(np.isfinite(np.asarray(out)))
    with pytest.raises(ValueError, match="normaliser"):
        lit.DyDiLAConfig.from_config({"normaliser": "softmax"})


# ----------------------------------------------------------------------------- inheritance + distillation


@pytest.fixture(scope="module")
def imported():
    from tests.conftest import GOLDEN

    data = np.load(GOLDEN / "dit.npz")
    sd = {k[len("param/"):]: data[k] for k in data.files if k.startswith("param/")}
    meta = json.loads((GOLDEN / "dit.json").read_text())["constructor"]
    config = tiny_lit_config("dydila", **{"distill.enabled": True, "distill.teacher_num_heads": meta["num_heads"]})
    config.model.update({k: meta[k] for k in ("input_size", "patch_size", "in_channels", "hidden_size", "depth",
                                              "num_classes", "learn_sigma")})
    config.data.num_classes = meta["num_classes"]
    params, rest = lit.IMPORTERS["dydi_lit"](sd, config)
    return config, sd, params, rest


def test_weight_inheritance_takes_everything_but_attention(imported):
    config, sd, params, rest = imported
    converted = dit.params_from_torch(sd, config.model.depth)
    np.testing.assert_array_equal(params["blocks"][0]["mlp"]["fc1"]["kernel"],
                                  converted["blocks"][0]["mlp"]["fc1"]["kernel"])
    np.testing.assert_array_equal(params["final_layer"]["linear"]["bias"], sd["final_layer.linear.bias"])
    fresh_qkv = params["blocks"][0]["attn"]["qkv"]["kernel"]
    assert fresh_qkv.shape == converted["blocks"][0]["attn"]["qkv"]["kernel"].shape
    assert not np.allclose(fresh_qkv, converted["blocks"][0]["attn"]["qkv"]["kernel"])
    assert bool(rest["teacher_loaded"])
    np.testing.assert_array_equal(rest["teacher"]["blocks"][1]["attn"]["qkv"]["kernel"],
                                  sd["blocks.1.attn.qkv.weight"].T)


def test_distillation_loss_is_hybrid_with_lit_weights(imported):
    config, sd, params, rest = imported
    method = get_method(config)
    method.validate_config(config)
    model = ModelDef(method).merge(params, rest)
    # the teacher is the DiT: its forward equals the dit fixture's reference
    from tests.conftest import GOLDEN

    data = np.load(GOLDEN / "dit.npz")
    x = jnp.transpose(jnp.asarray(data["in/x"]), (0, 2, 3, 1))
    ref = np.transpose(data["out/forward"], (0, 2, 3, 1))
    np.testing.assert_allclose(model.teacher(x, jnp.asarray(data["in/t"]), jnp.asarray(data["in/y"], jnp.int32)),
                               ref, atol=1e-4)
    b = x.shape[0]
    batch = {"latent": x, "label": jnp.arange(b, dtype=jnp.int32)}
    loss, m = method.loss(model, batch, jax.random.PRNGKey(0))
    np.testing.assert_allclose(loss, m["mse"] + m["vb"] + 0.5 * m["kd_eps"] + 0.05 * m["kd_var"], rtol=1e-5)
    assert float(m["kd_eps"]) > 0 and float(m["kd_var"]) > 0
    # no gradient reaches the teacher: it is not a parameter
    assert "teacher" not in params


def test_distillation_refuses_a_teacher_that_was_never_loaded():
    config = tiny_lit_config("lit", **{"distill.enabled": True, "distill.teacher_num_heads": 2})
    config.model.learn_sigma = True
    method = get_method(config)
    model = method.create_model(nnx.Rngs(0))
    batch = {"image": jnp.zeros((2, 16, 16, 1)), "label": jnp.zeros((2,), jnp.int32)}
    with pytest.raises(Exception, match="never loaded"):
        jax.block_until_ready(method.loss(model, batch, jax.random.PRNGKey(0)))


# ----------------------------------------------------------------------------- configs, sharding


PAPER_DIT_PARAMS_M = {"S": 33.0, "XL": 675.0}


@pytest.mark.parametrize("size", ["S"])  # XL (printed by benchmarks/dydila.py --counts) is slow to build
def test_config_parameter_counts(size):
    """LiT keeps DiT's parameter count (heads do not change it; + the tiny DWC); DyDi-LiT adds its
    projector banks, 2 n_P d^2 per block (the note's estimate: +223M at XL with n_P = 3)."""
    import importlib

    counts = {}
    for name in ("lit", "dydi_lit"):
        config = importlib.import_module(f"configs.{name}_{size.lower()}").get_config("256")
        md = ModelDef(get_method(config))
        counts[name] = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(md.abstract_params))
        teacher = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(md.abstract_rest["teacher"]))
        assert abs(teacher / 1e6 - PAPER_DIT_PARAMS_M[size]) / PAPER_DIT_PARAMS_M[size] < 0.02
    m = config.model
    assert abs(counts["lit"] / 1e6 - PAPER_DIT_PARAMS_M[size]) / PAPER_DIT_PARAMS_M[size] < 0.02
    banks = m.depth * 2 * m.dydila.num_projectors * m.hidden_size ** 2
    assert 0 < counts["dydi_lit"] - counts["lit"] - banks < 0.01 * counts["lit"]  # + routers and banks of scalars
    print(f"{size}: LiT {counts['lit'] / 1e6:.2f}M, DyDi-LiT {counts['dydi_lit'] / 1e6:.2f}M")


def test_every_parameter_has_logical_axis_names():
    model_def = ModelDef(get_method(tiny_lit_config("dydila")))
    names = jax.tree.leaves(model_def.param_names(), is_leaf=lambda x: isinstance(x, tuple) or x is None)
    assert names and all(isinstance(n, tuple) for n in names)


def test_sampler_is_dits_p_sample_loop():
    config = tiny_lit_config("lit")
    method = get_method(config)
    model = method.create_model(nnx.Rngs(0))
    out = method.sample(model, jax.random.PRNGKey(0), jnp.array([1, 2]), num_steps=2, cfg_scale=1.0)
    rng_init, rng_loop = jax.random.split(jax.random.PRNGKey(0))
    d = diffusion.create_diffusion("2")
    ref = d.p_sample_loop(lambda x, t: model(x, t, jnp.array([1, 2])), rng_loop,
                          jax.random.normal(rng_init, out.shape), clip_denoised=config.sample.clip_denoised)
    np.testing.assert_allclose(out, ref, atol=1e-5)


@pytest.mark.slow
def test_sharded_mesh_matches_one_device(tmp_path):
    """DyDi-LiT on 8 simulated devices, mesh (data=2, fsdp=2, tensor=2) vs one device: five train steps."""
    proc = run_python(["tests/sharded_equivalence.py", str(tmp_path), "dydi_lit"],
                      env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}, timeout=1500)
    report = json.loads(proc.stdout.split("REPORT ", 1)[1].splitlines()[0])
    np.testing.assert_allclose(report["losses_sharded"], report["losses_single"], rtol=1e-5)
    # Measured: losses equal to 1e-7, tree 4.6e-5, worst tensor 1.05e-4 (the 5x5 DWC kernel, whose small
    # gradients Adam normalises, amplifying reduction-order differences); a wrong sharding gives O(1).
    assert report["max_param_rel_diff"] <= 1e-3, report
    assert report["tree_rel_diff"] <= 2e-4, report
    assert report["wrong_specs"] == [], report
    assert "fsdp" in report["axes_used"] and "tensor" in report["axes_used"]
