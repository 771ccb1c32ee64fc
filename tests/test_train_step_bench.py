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


def test_reference_line_states_the_matmul_floor(capsys):
    """The floor: the model's FLOPs at the run's matmul rate over the reference's step, and the model-FLOP/s
    fraction that a ratio of 0.8 would need (here 40 GFLOP at 200 GFLOP/s = 0.2 s of a 1 s step)."""
    bench = _train_step()
    ours = {"model": "m", "batch": 2, "step": 0.9, "params": 1e6, "cpu_step": 1.5, "model_gflop": 40.0,
            "mm_tflops": 0.2, "ref": {"steps": 3, "step": 1.0, "params": 1e6, "threads": 2, "cpu_step": 2.0}}
    bench.print_against_reference(ours, "ref")
    out = capsys.readouterr().out
    assert "= 0.90 (target <= 0.8)" in out
    assert "200 ms = 0.20 of ref's step" in out and ">= 0.25 of the matmul rate (ref: 0.20)" in out
