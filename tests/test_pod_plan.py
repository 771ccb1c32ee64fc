"""benchmarks/pod_plan.py on a tiny xAR and 8 simulated CPU devices: the depth probe against the real
full-depth compile, the exact state bytes, the collectives of FSDP / tensor layouts, the table."""

import importlib.util

import pytest

from tests.conftest import REPO

# A tiny xAR (16x16x1 pixels, patch 4 -> 4x4 grid, 4 cells of 2x2 tokens, width 32, 2+2 blocks), batch 16.
TINY = ["model.input_size=16", "data.image_size=16", "model.patch_size=4", "model.hidden_size=32",
        "model.num_heads=2", "model.cell_size=2", "model.encoder_depth=2", "model.decoder_depth=2", "batch_size=16"]


def _pod_plan():
    spec = importlib.util.spec_from_file_location("pod_plan", REPO / "benchmarks" / "pod_plan.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def plans():
    pod_plan = _pod_plan()
    model = "configs.xar_b:demo"
    probe = pod_plan.run(model, "8", layouts="4x2,8x1", overrides=TINY, timeout=600)
    full = pod_plan.run(model, "8", layouts="4x2", overrides=TINY, full_depth=True, timeout=600)
    return pod_plan, probe, full


def test_rows_and_exact_state_bytes(plans):
    _, probe, full = plans
    assert [(r["fsdp"], r["tensor"]) for r in probe] == [(4, 2), (8, 1)]
    assert all("error" not in r for r in probe + full), probe + full
    p, f = probe[0], full[0]
    assert (p["probe"], f["probe"]) == ("d1/d2", "full")
    # the probe's state is the full-depth state's, so XLA's argument bytes (state + batch) match exactly
    for key in ("n_params", "params", "opt", "ema", "args"):
        assert p[key] == f[key], key
    param_bytes = p["n_params"] * 4
    for r in probe:  # every weight matrix is split over the 8 devices; norms/biases stay replicated
        assert param_bytes / 8 <= r["params"] < param_bytes / 2
        assert r["ema"] == r["params"]
        assert 2 * r["params"] <= r["opt"] <= 2 * r["params"] + 64  # AdamW mu and nu (+ the step count)


def test_depth_probe_extrapolates_the_full_compile(plans):
    _, probe, full = plans
    p, f = probe[0], full[0]
    assert p["temp"] > 0
    assert abs(p["temp"] - f["temp"]) <= 0.25 * f["temp"], (p["temp"], f["temp"])
    gathers_p, gathers_f = p["collectives"]["all-gather"], f["collectives"]["all-gather"]
    assert gathers_f > 0  # FSDP gathers the sharded weights
    assert abs(gathers_p - gathers_f) <= 0.25 * gathers_f, (p["collectives"], f["collectives"])


def test_table_names_the_layout_that_fits(plans):
    pod_plan, probe, _ = plans
    text = pod_plan.table(probe)
    assert "fsdp 8 x tensor 1" in text or "fsdp 4 x tensor 2" in text
    assert "fits [16, 32, 95]" in text and "probe d1/d2" in text
    best = pod_plan.best_layouts(probe)[("configs.xar_b:demo", 8)]
    assert best["total"] == min(r["total"] for r in probe)
    assert pod_plan.fits({"total": 20 * 2 ** 30}) == [32, 95]
