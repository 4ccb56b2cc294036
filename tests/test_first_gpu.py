"""benchmarks/first_gpu.py, the one command for a first GPU, stays runnable: its --smoke form under the CPU
interpreter runs the kernel tests without conftest, the autotune step and benchmarks/attention.py --smoke --model."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
pytestmark = pytest.mark.kernels
ROOT = Path(__file__).resolve().parents[1]


def test_first_gpu_command_smoke(tmp_path):
    out = tmp_path / "first_gpu"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "first_gpu.py"), "--smoke", "--out", str(out)],
                          cwd=ROOT, env={**os.environ, "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "0")},
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    summary = (out / "summary.md").read_text()
    assert summary.count("exit 0") == 2 and "profiles tuned" in summary, summary
    log = (out / "kernel_tests.log").read_text()
    assert " passed" in log and "failed" not in log, log

    tuned = json.loads((out / "autotune.json").read_text())["rows"]
    assert [r["profile"] for r in tuned] == ["t5-encoder", "roformer-unilm"]
    assert all(r["default_ms"] > 0 and r["tuned_ms"] > 0 and r["max_rel_difference"] <= 2e-2 for r in tuned)

    # benchmarks/attention.py: every candidate's forward checked against the reference, then timed
    results = json.loads((out / "attention.json").read_text())
    assert len(results["checks"]) == 10 and max(results["checks"].values()) < 1e-4
    timed = {(r["scenario"], r["mode"], r["candidate"]) for r in results["kernels"] if r["ms"]}
    for scenario, candidate in [("t5-encoder", "ours"), ("t5-decoder-causal", "ours"), ("rope", "ours-rope-in-kernel"),
                                ("rope", "ours-rope-outside"), ("t5-encoder", "sdpa+bias")]:
        assert {(scenario, "fwd", candidate), (scenario, "fwd+bwd", candidate)} <= timed
    assert [r["backend"] for r in results["model"] if r["ms"]] == ["sdpa", "triton"]

    # a base-size training step per family (smoke: tiny, eager): figures, and no MFU without a known peak
    step = json.loads((out / "pretraining_step.json").read_text())
    assert [(r["family"], r["checkpointing"]) for r in step["rows"]] == [
        ("t5_pegasus", "none"), ("t5_pegasus", "selective"), ("roformer_v2", "none"), ("roformer_v2", "selective")]
    assert all(r["tokens_per_s"] > 0 and r["tflops"] > 0 and r["mfu"] is None for r in step["rows"])
    assert "MFU not reported" in step["peak"] and "pretraining step: 4 configurations" in summary
