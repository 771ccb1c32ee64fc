"""Shared test helpers: paths, the tiny DiT config every loop test uses, subprocess runners."""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO.parent / "shared" / "golden"


def _share_compilation_cache():
    """One persistent XLA compilation cache per test run, shared by the pytest-xdist workers and by every
    process they start (the loop tests start many that compile the same tiny programs). The run's first
    process makes it (the workers inherit the variables) and removes it at the end. A user's own
    JAX_COMPILATION_CACHE_DIR is left alone."""
    if "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return None
    path = tempfile.mkdtemp(prefix="genzoo-test-xla-cache-")
    os.environ.update(JAX_COMPILATION_CACHE_DIR=path, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.2",
                      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    if "jax" in sys.modules:  # imported before this file (a plugin): its config read the environment already
        sys.modules["jax"].config.update("jax_compilation_cache_dir", path)
    return path


_OWN_CACHE = _share_compilation_cache()

# The tests' programs are tiny and compiled once or twice each, so LLVM's optimisation of the generated
# code costs more than it saves: at level 0 the suite's many compiles are ~2.4x faster (a ReTok train-state
# init: 11.5 -> 4.8 s) and the values move only in the last bits (every tolerance holds). XLA's own HLO
# passes (fusion, layout, simplification) run as in a user's run. Set for this process (before any
# backend starts) and passed to every process the tests start (``run_python``).
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
if TEST_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):  # also imported by the tests' worker scripts
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + TEST_XLA_FLAGS).strip()


def pytest_unconfigure(config):
    if _OWN_CACHE:  # only its maker removes it (a worker makes its own only when the controller did not)
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)

# The tiny DiT every loop test trains: 16x16x1 pixels, 16 tokens, width 32, 2 blocks.
TINY_DIT_OVERRIDES = [
    "--config.model.input_size=16", "--config.model.patch_size=4", "--config.model.hidden_size=32",
    "--config.model.depth=2", "--config.model.num_heads=2", "--config.data.image_size=16",
    "--config.batch_size=8", "--config.optim.warmup_steps=2", "--config.log_every=1",
    "--config.num_grid_samples=4", "--config.sample.num_steps=2", "--config.sample_batch_size=8",
]


def tiny_dit_config(**overrides):
    """The tiny DiT config as a ConfigDict (in-process tests)."""
    from configs import dit_s

    c = dit_s.get_config("demo")
    c.model.update(input_size=16, patch_size=4, hidden_size=32, depth=2, num_heads=2)
    return _tiny_run(c, overrides)


def tiny_xar_config(**overrides):
    """A tiny xAR (16x16x1 pixels, patch 4 -> 4x4 grid, 4 cells of 2x2 tokens, width 32, 1+1 blocks)."""
    from configs import xar_b

    c = xar_b.get_config("demo")
    c.model.update(input_size=16, patch_size=4, hidden_size=32, encoder_depth=1, decoder_depth=1, num_heads=2,
                   cell_size=2, scales=(1, 2, 4))
    return _tiny_run(c, overrides)


def tiny_tokenbridge_config(**overrides):
    """A tiny TokenBridge (16x16x1 pixels, patch 4 -> 4x4 grid of 16-dim tokens, width 32, 1+1+1 blocks)."""
    from configs import tokenbridge_b

    c = tokenbridge_b.get_config("demo")
    c.model.update(input_size=16, encoder_embed_dim=32, encoder_depth=1, encoder_num_heads=2,
                   decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, channel_embed_dim=32,
                   channel_depth=1, channel_heads=2, buffer_size=4)
    return _tiny_run(c, overrides)


def _tiny_run(c, overrides):
    """Loop settings every tiny test model shares (16x16 pixels, batch 8, log every step), then overrides."""
    c.data.image_size = 16
    c.batch_size = 8
    c.optim.warmup_steps = 2
    c.log_every = 1
    c.num_grid_samples = 4
    c.sample.num_steps = 2
    c.sample_batch_size = 8
    c.eval.num_samples = 0
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def run_python(args, *, env=None, timeout=600, check=True, cwd=REPO, optimize=False):
    """Run `python args...` from the repo root; returns the CompletedProcess (stdout+stderr merged).
    ``optimize``: compile at XLA's default optimisation level, for a process whose runtime outweighs its
    compiles (encoding the whole embedded dataset), instead of ``TEST_XLA_FLAGS``."""
    full_env = dict(os.environ)
    full_env.setdefault("JAX_PLATFORMS", "cpu")
    full_env.pop("XLA_FLAGS", None)
    full_env.update(env or {})
    if not optimize:
        full_env["XLA_FLAGS"] = (full_env.get("XLA_FLAGS", "") + " " + TEST_XLA_FLAGS).strip()
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=full_env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}:\n{proc.stdout[-6000:]}")
    return proc


@pytest.fixture
def golden():
    if not GOLDEN.exists():
        pytest.fail(f"golden fixtures not found at {GOLDEN} (shared/ must sit beside the checkout)")
    return GOLDEN
