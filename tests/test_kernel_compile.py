"""The attention kernels compiled for an H100 (sm_90) without a GPU: within shared memory and free of register
spills in the model profiles at head dim 64. In its own process: the suite runs Triton's interpreter, and the
compile check needs Triton's compiler (ptxas ships in the triton wheel). The whole matrix (sm_80 and sm_90, bf16 and
fp16, head dims 32/64/128, eight profiles, every autotuning candidate) is
`python -m suformer.attention.triton.compile_check`.
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
pytestmark = [pytest.mark.kernels, pytest.mark.skipif(
    not triton.__version__.startswith("3.9."), reason="the compile check uses Triton 3.9's private compile API")]
ROOT = Path(__file__).resolve().parents[1]
ENV = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}


def _python(*args, timeout=600):
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def test_the_model_profiles_compile_for_h100_within_shared_memory_without_spills(tmp_path):
    out = tmp_path / "quick.json"
    done = _python("-m", "suformer.attention.triton.compile_check", "--quick", "--workers", "1", "--json", str(out))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    results = json.loads(out.read_text())
    launched = {(r["profile"], r["kernel"]) for r in results}
    for profile in ["t5-encoder", "t5-decoder", "roformer-unilm"]:
        assert {(profile, "fwd"), (profile, "dkdv"), (profile, "dq")} <= launched
    for r in results:
        assert not r["error"] and r["registers"] > 0 and r["shared_kib"] * 1024 <= 227 * 1024
        assert r["spill_bytes"] == 0, r
        if r["kernel"] != "keep_mask":  # bf16 dots on Hopper tensor cores
            assert r["mma"] == "wgmma", r


def test_the_check_reports_overruns_and_spills():
    """The counter-test: the tiles the kernels launched before (128x64, 4 warps at head dim 64, 3 stages for all
    three kernels) spill in T5 training, and 3 stages of 128x64 overrun shared memory at head dim 128."""
    script = textwrap.dedent("""
        from suformer.attention.triton import compile_check, configs
        configs.GPU_CONFIGS[90]["dkdv"][64] = [configs._config(128, 64, 4, 3)]
        configs.GPU_CONFIGS[90]["fwd"][128] = [configs._config(128, 64, 8, 3)]
        results = compile_check.run([90], ["bfloat16"], [64], ["t5-encoder"], False, ["dkdv", "fwd"], workers=1)
        results += compile_check.run([90], ["bfloat16"], [128], ["everything"], False, ["fwd"], workers=1)
        for problem in compile_check.problems(results):
            print(problem)
    """)
    done = _python("-c", script)
    assert done.returncode == 0, done.stderr[-4000:]
    problems = done.stdout.splitlines()
    assert any("t5-encoder dkdv 128x64/4w/3s: spills" in p for p in problems), problems
    assert any("everything fwd 128x64/8w/3s" in p and "over the 227 KiB" in p for p in problems), problems
    assert not any("t5-encoder fwd" in p for p in problems), problems  # the new forward tile is compiled beside


def test_the_check_refuses_the_interpreter():
    done = subprocess.run([sys.executable, "-m", "suformer.attention.triton.compile_check", "--quick"], cwd=ROOT,
                          env={**ENV, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "unset TRITON_INTERPRET" in done.stderr
