"""benchmarks/train_step.py's harness without its models: the PyTorch side's interleaved stepping
protocol (TorchStepper) and the flag errors that come before any compile."""

import importlib.util

import pytest

from tests.conftest import REPO, run_python


def _train_step():
    spec = importlib.util.spec_from_file_location("train_step_bench", REPO / "benchmarks" / "train_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The protocol of TORCH_DIT / TORCH_XAR with a counter for a model: a ready line, then one timed step per
# "step" line; anything else ends it. Noise lines before the JSON (warnings) are skipped by the reader.
FAKE = r"""
import json, sys, time
print("a warning line", flush=True)
print(json.dumps({"ready": True, "params": 7, "threads": 1}), flush=True)
n = 0
for line in sys.stdin:
    if line.strip() != "step":
        break
    n += 1
    print(json.dumps({"step": 0.25 * n, "cpu_step": 0.5 * n}), flush=True)
"""


def test_torch_stepper_steps_between_rounds_and_takes_per_row():
    bench = _train_step()
    ref = bench.TorchStepper(FAKE, [], "fake reference")
    try:
        assert ref.info == {"ready": True, "params": 7, "threads": 1}
        for _ in range(3):
            ref.step()
        first = ref.take()
        ref.step()
        second = ref.take()
    finally:
        ref.close()
    assert first == {"step": 0.5, "cpu_step": 1.0, "params": 7, "threads": 1, "steps": 3}
    assert second["step"] == 1.0 and second["steps"] == 1
    assert ref.proc.returncode == 0


def test_torch_stepper_failure_names_the_reference_and_its_error():
    bench = _train_step()
    with pytest.raises(RuntimeError, match=r"(?s)broken reference failed.*no such module here"):
        bench.TorchStepper("raise SystemExit('no such module here')", [], "broken reference")


def test_bad_flags_fail_before_compiling(tmp_path):
    proc = run_python(["benchmarks/train_step.py", "--xar_dropout=float"], check=False, timeout=120)
    assert proc.returncode == 2 and "--xar_dropout=float" in proc.stdout
    proc = run_python(["benchmarks/train_step.py", f"--torch_ref={tmp_path}"], check=False, timeout=120)
    assert proc.returncode != 0 and "no models/xar.py there" in proc.stdout
