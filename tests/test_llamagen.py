"""LlamaGen GPT (models/llamagen.py): golden fixture, sizes, cached == teacher-forced, sampling
semantics (filters, guidance plan), the objective learns, importer errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import llamagen_gpt
from models import llamagen
from trainers import convert
from trainers.method import get_method


def test_golden_fixture_through_converter(golden):
    assert convert.check(golden / "llamagen_gpt.npz")


@pytest.mark.parametrize("size,expected_m", [("b", 111), ("l", 343), ("xl", 775)])
def test_parameter_counts_match_upstream(size, expected_m):
    c = llamagen_gpt.get_config(size)
    model = nnx.eval_shape(lambda: get_method(c).create_model(nnx.Rngs(0)))
    n = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
    # upstream's comments round to the million; the class-token table is 1001 x dim here as there
    assert abs(n / 1e6 - expected_m) / expected_m < 0.01, n


@pytest.fixture(scope="module")
def tiny():
    return llamagen.GPT(vocab_size=32, dim=32, n_layer=2, n_head=2, block_size=8, num_classes=4,
                        rngs=nnx.Rngs(0))


def _randomise(model):
    _, params, rest = nnx.split(model, nnx.Param, ...)
    leaves, tree = jax.tree.flatten(nnx.to_pure_dict(params))
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    nnx.replace_by_pure_dict(params, jax.tree.unflatten(
        tree, [0.3 * jax.random.normal(k, v.shape) + (v if v.ndim == 1 else 0) for k, v in zip(keys, leaves)]))
    return nnx.merge(nnx.graphdef(model), params, rest)


def test_cached_steps_equal_teacher_forced_logits(tiny):
    model = _randomise(tiny)
    labels = jnp.array([0, 3])
    codes = jax.random.randint(jax.random.PRNGKey(2), (2, 8), 0, 32)
    full = model(codes[:, :-1], labels)
    cache = model.init_cache(2)
    assert cache[0][0].shape[2] == 16  # find_multiple(block_size + 1, 8)
    logits, cache = model.step(None, labels, jnp.int32(0), cache)
    steps = [logits]
    for s in range(7):
        logits, cache = model.step(codes[:, s], None, jnp.int32(s + 1), cache)
        steps.append(logits)
    np.testing.assert_allclose(np.stack(steps, 1), full, atol=2e-5)


def test_generate_forced_tokens_and_greedy(tiny):
    model = _randomise(tiny)
    labels = jnp.array([1, 2])
    greedy = llamagen.generate(model, jax.random.PRNGKey(0), labels, sample_logits=False)
    # Greedy decoding is the argmax of the teacher-forced logits on its own output.
    full = model(greedy[:, :-1], labels)
    np.testing.assert_array_equal(np.asarray(jnp.argmax(full, -1)), np.asarray(greedy))
    # Temperature near 0 samples the argmax too.
    cold = llamagen.generate(model, jax.random.PRNGKey(5), labels, temperature=1e-6)
    np.testing.assert_array_equal(np.asarray(cold), np.asarray(greedy))
    # Forced tokens come back unchanged and top-k 1 is greedy.
    top1 = llamagen.generate(model, jax.random.PRNGKey(7), labels, top_k=1)
    np.testing.assert_array_equal(np.asarray(top1), np.asarray(greedy))


def test_guidance_at_scale_one_runs_one_batch_and_equals_unguided(tiny):
    model = _randomise(tiny)
    labels = jnp.array([0, 1, 2])
    key = jax.random.PRNGKey(3)
    a = llamagen.generate(model, key, labels, cfg_scale=1.0)
    b = llamagen.generate(model, key, labels)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_guidance_plan_matches_upstream_semantics():
    scales, flags = llamagen.guidance_plan(5, 3.0, cfg_interval=1, cfg_schedule="linear")
    np.testing.assert_allclose(scales, [3.0, 1.5001, 2.0001, 2.5001, 3.0001])
    assert flags.tolist() == [True, True, True, False, False]
    scales, _ = llamagen.guidance_plan(5, 1.5, cfg_schedule="step", window_start=0.5)
    np.testing.assert_allclose(scales, [1.5, 1.0001, 1.5, 1.5, 1.5])


def test_top_k_top_p_filtering():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda x: np.isfinite(np.asarray(x))[0].tolist()  # noqa: E731
    assert kept(llamagen.top_k_top_p_filtering(logits, top_k=2)) == [True, True, False, False]
    # cumulative 0.5, 0.8, 0.95, 1.0: > 0.7 from the second on, shifted right: the first two stay
    assert kept(llamagen.top_k_top_p_filtering(logits, top_p=0.7)) == [True, True, False, False]
    assert kept(llamagen.top_k_top_p_filtering(logits, top_p=0.4)) == [True, False, False, False]
    shuffled = logits[:, ::-1]
    assert kept(llamagen.top_k_top_p_filtering(shuffled, top_p=0.7)) == [False, False, True, True]


def test_objective_learns_a_class_dependent_sequence():
    import optax

    c = llamagen_gpt.get_config("demo")
    c.model.update(vocab_size=16, block_size=8, dim=32, n_layer=1, n_head=2)
    method = get_method(c)
    model = method.create_model(nnx.Rngs(0))
    labels = jnp.arange(8) % c.data.num_classes
    codes = (labels[:, None] * 3 + jnp.arange(8)[None]) % 16  # each class one fixed sequence
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    opt = optax.adam(3e-3)
    opt_state = opt.init(params)

    @jax.jit
    def step(params, opt_state, key):
        def f(p):
            return method.loss(nnx.merge(graphdef, p, rest), {"latent": codes, "label": labels}, key)[0]
        loss, g = jax.value_and_grad(f)(params)
        updates, opt_state = opt.update(g, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    for i in range(150):
        params, opt_state, loss = step(params, opt_state, jax.random.PRNGKey(i))
        losses.append(float(loss))
    assert losses[-1] < 0.25 * losses[0], (losses[0], losses[-1])
    trained = nnx.merge(graphdef, params, rest)
    sampled = method.sample(trained, jax.random.PRNGKey(0), labels, cfg_scale=1.0, temperature=1e-6)
    assert float(jnp.mean(sampled == codes)) > 0.9


def test_importer_names_what_is_wrong():
    c = llamagen_gpt.get_config("demo")
    with pytest.raises(ValueError, match="not a LlamaGen GPT"):
        llamagen.import_gpt({"blocks.0.weight": np.zeros(3)}, c)
