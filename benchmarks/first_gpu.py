"""The first run on a GPU: kernel correctness in bf16/fp16, autotuning, the attention benchmark; one folder of results.

    python benchmarks/first_gpu.py --out first_gpu                        # one H100/H200: about 10 minutes
    TRITON_INTERPRET=1 python benchmarks/first_gpu.py --smoke --out /tmp/first_gpu   # CPU: checks the command runs

Needs only torch, triton and pytest (run from the repository root; no Ray, MLflow or tokenizer packages). Steps,
each run even when an earlier one failed, each writing into --out:

1. `environment.json`: device, compute capability, torch, triton and CUDA versions, date.
2. `kernel_tests.log`, `kernel_tests.xml`: tests/test_kernels.py without the suite's conftest (fp32 against the
   float64 reference, bf16/fp16 against FlashAttention's error criterion, a tiny model's training step).
3. `autotune.json`: per model profile (T5 PEGASUS base / RoFormerV2 base shapes, bf16, 16k tokens), the tile each
   kernel picks and every candidate's time, and forward+backward with the default tile against the tuned one.
4. `attention.json`, `attention.log`: benchmarks/attention.py with the T5 PEGASUS training step (--model).
5. `pretraining_step.json`: a base-size training step (forward, backward) of each family in bf16 at the shipped
   8 x H100 configs' micro-batches (T5 PEGASUS 12 x 384 + 128 tokens, RoFormerV2 64 x 512 packed), eager and
   compiled, activation checkpointing none / selective / full: real tokens/s, model TFLOP/s, MFU against the
   device's peak (suformer/train/flops.py), the most memory allocated. Which defaults to ship follows from it.

Writes `summary.md` (one line per step) and exits 1 if any step failed.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from suformer.attention.triton import flash  # noqa: E402
from suformer.attention.triton.configs import KERNELS, arch_class, head_dim_class  # noqa: E402
from suformer.attention.triton.profiles import PROFILES  # noqa: E402

CUDA = torch.cuda.is_available()
MODEL_PROFILES = [name for name, profile in PROFILES.items() if profile.model]


def environment() -> dict:
    import triton

    env = dict(date=date.today().isoformat(), torch=torch.__version__, triton=triton.__version__,
               cuda=torch.version.cuda, interpreter=os.environ.get("TRITON_INTERPRET") == "1")
    if CUDA:
        capability = torch.cuda.get_device_capability()
        env.update(device=torch.cuda.get_device_name(), capability=f"{capability[0]}.{capability[1]}")
    return env


def kernel_tests(out: Path, smoke: bool) -> str:
    """pytest on tests/test_kernels.py in a subprocess, without conftest.py (it needs the suite's services). With
    the default tiles (the compile-checked first candidates): tuning every test's shape class would take minutes
    of compiling; the tuned path is checked in step 3 and by the file's own autotune test."""
    selection = ["-k", "t5-encoder-padded or rope-unilm"] if smoke else []
    command = [sys.executable, "-m", "pytest", "-q", "--noconftest", "-o", "addopts=", "-p", "no:cacheprovider",
               f"--junitxml={out / 'kernel_tests.xml'}", str(ROOT / "tests" / "test_kernels.py"), *selection]
    with open(out / "kernel_tests.log", "w") as log:
        done = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "SUFORMER_KERNEL_AUTOTUNE": "0"})
    last = (out / "kernel_tests.log").read_text().strip().splitlines()[-1:]
    return f"exit {done.returncode}: {last[0] if last else ''}"


def _milliseconds(fn, reps: int) -> float:
    """Triton's do_bench on a GPU (its mean over ~100 ms of calls); on CPU the median of `reps` calls."""
    if CUDA:
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100)
    times = []
    for _ in range(reps):
        begin = time.perf_counter()
        fn()
        times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


def autotune(out: Path, smoke: bool) -> str:
    """Tune each model profile's three kernels; check the tuned tiles compute what the default ones do; time
    forward+backward with both."""
    dtype = torch.float32 if smoke else torch.bfloat16
    batch, heads, length, head_dim = (1, 2, 48, 32) if smoke else (32, 12, 512, 64)
    device = "cuda" if CUDA else "cpu"
    reps = 1 if smoke else 10
    rows, disagreements, autotune_before = [], [], flash.AUTOTUNE
    for name in ["t5-encoder", "roformer-unilm"] if smoke else MODEL_PROFILES:
        q, k, v, kwargs = PROFILES[name].inputs(batch, heads, length, head_dim, dtype, device,
                                               torch.Generator().manual_seed(0))
        kwargs["dropout_seed"] = 7  # the same dropout mask in every call, so both tilings can be compared
        grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)

        def step():
            out = flash.flash_attention(q, k, v, **kwargs)
            return [out, *torch.autograd.grad(out, (q, k, v), grad)]

        row = dict(profile=name, batch=batch, heads=heads, length=length, head_dim=head_dim, dtype=str(dtype))
        tuners = {}
        if CUDA:  # under the interpreter the tiles are fixed (configs.CPU_CONFIG): nothing is tuned
            arch = arch_class(torch.cuda.get_device_capability())
            tuners = {kernel: flash._autotuned(kernel, arch, head_dim_class(head_dim)) for kernel in KERNELS}
        for tuner in tuners.values():
            tuner.configs_timings = {}  # this profile's tuning fills it (also from Triton's disk cache)
        try:
            flash.AUTOTUNE = True
            tuned = step()  # tunes: the first call of a shape class times every candidate
            row["chosen"] = {kernel: str(tuner.best_config) for kernel, tuner in tuners.items()}
            row["candidates_ms"] = {kernel: {str(c): t for c, t in tuner.configs_timings.items()}
                                    for kernel, tuner in tuners.items()}
            row["tuned_ms"] = _milliseconds(step, reps)
            flash.AUTOTUNE = False
            default = step()
            row["default_ms"] = _milliseconds(step, reps)
        finally:
            flash.AUTOTUNE = autotune_before
        row["x_tuned_vs_default"] = row["default_ms"] / row["tuned_ms"]
        # Different tiles only change the order of fp32 accumulations: bf16 outputs agree to a few ulps.
        row["max_rel_difference"] = max(((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
                                        for a, b in zip(tuned, default))
        if not row["max_rel_difference"] <= 2e-2:
            disagreements.append(f"{name}: {row['max_rel_difference']:.2e}")
        rows.append(row)
        print(f"| {name} | default {row['default_ms']:.2f} ms | tuned {row['tuned_ms']:.2f} ms | "
              f"{row['x_tuned_vs_default']:.2f}x | max rel diff {row['max_rel_difference']:.1e} | "
              f"{row['chosen'] or 'interpreter: fixed tiles'} |", flush=True)
    (out / "autotune.json").write_text(json.dumps(dict(environment=environment(), rows=rows), indent=1))
    if disagreements:
        raise AssertionError(f"tuned and default tiles disagree: {', '.join(disagreements)}")
    return f"{len(rows)} profiles tuned"


def attention_benchmark(out: Path, smoke: bool) -> str:
    args = ["--smoke"] if smoke else ["--lengths", "1024", "2048", "8192", "--reps", "10"]
    command = [sys.executable, str(ROOT / "benchmarks" / "attention.py"), "--model", *args,
               "--output", str(out / "attention.json")]
    with open(out / "attention.log", "w") as log:
        done = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    return f"exit {done.returncode}"


STEP_CASES = [(False, "none"), (False, "selective"), (False, "full"), (True, "none"), (True, "selective")]
STEP_SHAPES = {"t5_pegasus": dict(rows=12, length=384, target=128, vocab_size=50000),
               "roformer_v2": dict(rows=64, length=512, vocab_size=12000)}


def pretraining_step(out: Path, smoke: bool) -> str:
    """Each family's base preset (smoke: tiny, fp32, eager) through benchmarks/efficiency.py's step, with MFU."""
    from benchmarks.efficiency import step_figures, synthetic_batches
    from suformer.models import build_model
    from suformer.train.efficiency import apply_efficiency
    from suformer.train.flops import device_peak

    device = torch.device("cuda" if CUDA else "cpu")
    dtype = torch.float32 if smoke else torch.bfloat16
    peak, peak_line = device_peak(device, "fp32" if smoke else "bf16")
    rows = []
    for family, shape in STEP_SHAPES.items():
        shape = dict(shape, rows=2, length=32, target=16) if smoke else shape
        batches = synthetic_batches(family, 3 if smoke else 13, **shape)
        for compiled, checkpointing in STEP_CASES[:2] if smoke else STEP_CASES:
            torch.manual_seed(0)
            model = build_model(family, "tiny" if smoke else "base", vocab_size=shape["vocab_size"]).to(device, dtype)
            apply_efficiency(model, checkpointing, 2, compiled)
            if CUDA:
                torch.cuda.reset_peak_memory_stats()
            figures = step_figures(model, batches, device, warmup=1 if smoke else 3)
            row = dict(family=family, compile=compiled, checkpointing=checkpointing, dtype=str(dtype), **shape,
                       **figures, mfu=figures["tflops"] * 1e12 / peak if peak else None,
                       max_allocated_gib=torch.cuda.max_memory_allocated() / 2**30 if CUDA else None)
            rows.append(row)
            mfu = "n/a" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%"
            print(f"| {family} | compile {compiled} | checkpointing {checkpointing} | {row['tokens_per_s']:,.0f} tok/s"
                  f" | {row['tflops']:.1f} TFLOP/s | MFU {mfu} | {row['max_allocated_gib'] or 0:.1f} GiB | "
                  f"first step {row['first_step_s']:.1f} s |", flush=True)
            del model
    (out / "pretraining_step.json").write_text(json.dumps(dict(environment=environment(), peak=peak_line,
                                                               rows=rows), indent=1))
    return f"{len(rows)} configurations; {peak_line}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for every result (created)")
    parser.add_argument("--smoke", action="store_true", help="tiny fp32 shapes (CPU, under TRITON_INTERPRET=1)")
    args = parser.parse_args(argv)
    if not CUDA and not args.smoke:
        print("error: no GPU here; on a CPU run `TRITON_INTERPRET=1 python benchmarks/first_gpu.py --smoke --out DIR`",
              file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "environment.json").write_text(json.dumps(environment(), indent=1))

    summary, failed = [], False
    steps = [("kernel tests", kernel_tests), ("autotune", autotune), ("attention benchmark", attention_benchmark),
             ("pretraining step", pretraining_step)]
    for index, (title, step) in enumerate(steps, 1):
        began = time.monotonic()
        print(f"[{index}/{len(steps)}] {title} ...", flush=True)
        try:
            outcome = step(args.out, args.smoke)
            failed |= outcome.startswith("exit") and not outcome.startswith("exit 0")
        except Exception as error:  # noqa: BLE001 - a failed step is reported; the next steps still run
            outcome, failed = f"failed: {type(error).__name__}: {error}", True
        line = f"{title}: {outcome} ({time.monotonic() - began:.0f} s)"
        print(f"[{index}/{len(steps)}] {line}", flush=True)
        summary.append(f"- {line}")
    (args.out / "summary.md").write_text("\n".join([f"# First GPU run, {json.dumps(environment())}", *summary]) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
