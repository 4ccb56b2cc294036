"""Compile the attention kernels for a GPU on a machine without one: shared memory, registers, spills, MMA kind.

    python -m suformer.attention.triton.compile_check           # every launch for sm_80 and sm_90 (~15 min on 2 cores)
    python -m suformer.attention.triton.compile_check --quick   # the suite's subset (sm_90, bf16, head dim 64 models)
    python -m suformer.attention.triton.compile_check --archs 90 --head-dims 128 --json out.json

Every launch the dispatcher can make is recorded from the real host code (`flash_attention` forward and backward on
CPU tensors of the profile's shapes, with each kernel launch captured instead of run), so the arguments are bound
exactly as Triton's JIT binds them on a GPU (the same specialisation of integers and pointer alignment); each
recorded launch is then compiled with every candidate configuration of configs.py for each target. Fails (exit 1)
on a compile error, shared memory over the target's per-block limit, or a register spill in a model profile at
head dims up to 64. Needs no GPU: ptxas ships in the triton wheel. Uses Triton's private compile API, valid for the
version pinned below; run it without TRITON_INTERPRET.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from typing import Optional
from unittest import mock

from .configs import KERNELS as ATTENTION_KERNELS
from .profiles import PROFILES

TRITON_VERSION = "3.9."  # the private API below (binder, ASTSource, ptxas log) as of this release
# Largest shared memory per block (opt-in), bytes: A100 (sm_80) 163 KiB, H100/H200 (sm_90) 227 KiB.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
KERNELS = (*ATTENTION_KERNELS, "keep_mask")
BATCH, HEADS, LENGTH = 2, 12, 512  # T5 PEGASUS base: 12 heads; the pretraining encoder length


QUICK = dict(archs=[90], dtypes=["bfloat16"], head_dims=[64],
             profiles=["t5-encoder", "t5-decoder", "roformer-unilm", "roformer-mlm-packed"], all_candidates=False)


@dataclass
class Result:
    arch: int
    dtype: str
    head_dim: int
    profile: str
    kernel: str
    config: str  # BLOCK_MxBLOCK_N/warps/stages
    default: bool  # the first candidate: the launch without autotuning
    shared_kib: float = 0.0
    registers: int = 0
    spill_bytes: int = 0
    mma: str = ""
    error: str = ""

    def problems(self, model_profile: bool) -> list[str]:
        where = f"sm_{self.arch} {self.dtype} d={self.head_dim} {self.profile} {self.kernel} {self.config}"
        if self.error:
            return [f"{where}: does not compile: {self.error}"]
        found = []
        if self.shared_kib * 1024 > SHARED_LIMIT[self.arch]:
            found.append(f"{where}: {self.shared_kib:.0f} KiB shared memory, over the {SHARED_LIMIT[self.arch] // 1024}"
                         " KiB per-block limit")
        if model_profile and self.head_dim <= 64 and self.spill_bytes and self.dtype != "float32":
            found.append(f"{where}: spills {self.spill_bytes} bytes per thread in a model profile (head dim <= 64)")
        return found


def _record_launches(profile, head_dim: int, dtype_name: str) -> dict:
    """{kernel: launch arguments} of one forward and backward through the host code, nothing launched."""
    import torch

    from . import flash

    recorded = {}
    gen = torch.Generator().manual_seed(0)
    q, k, v, kwargs = profile.inputs(BATCH, HEADS, LENGTH, head_dim, getattr(torch, dtype_name), "cpu", gen)
    # A seed like a random one: neither 1 nor a multiple of 16, which the JIT would specialise on.
    kwargs["dropout_seed"] = 12345
    with mock.patch.object(flash, "_launch", lambda name, grid, plan, **args: recorded.__setitem__(name, args)):
        out = flash.flash_attention(q, k, v, **kwargs)
        out.backward(torch.randn(out.shape, generator=gen).to(out.dtype))
    return recorded


def compile_for(kernel, arch: int, launch_kwargs: dict):
    """Compile one launch for sm_`arch` as Triton's JIT would on that GPU: (metadata, ptx, ptxas log)."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)  # not the active driver's: there is no GPU here
    kwargs = dict(launch_kwargs, debug=False, instrumentation_mode=knobs.compilation.instrumentation_mode,
                  fpsan_homomorphic_casts=knobs.compilation.fpsan_homomorphic_casts)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(**kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    knobs.nvidia.dump_ptxas_log = True  # printed on a cache miss only, hence always_compile
    knobs.compilation.always_compile = True
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        compiled = compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)
    return compiled.metadata, compiled.asm["ptx"], log.getvalue()


def _describe(config) -> str:
    return f"{config.kwargs['BLOCK_M']}x{config.kwargs['BLOCK_N']}/{config.num_warps}w/{config.num_stages}s"


def _check_one(job) -> list[Result]:
    """All candidates of every kernel for one (arch, dtype, head dim, profile)."""
    from . import configs, flash

    arch, dtype, head_dim, profile_name, all_candidates, kernels = job
    profile = PROFILES[profile_name]
    launches = _record_launches(profile, head_dim, dtype)
    results = []
    for name, args in launches.items():
        if name not in kernels:
            continue
        candidates = [configs.FP32_GPU_CONFIG] if dtype == "float32" else configs.candidates(name, head_dim, arch)
        for index, config in enumerate(candidates if all_candidates else candidates[:1]):
            results.append(_compiled(Result(arch, dtype, head_dim, profile.name, name, _describe(config), index == 0),
                                     flash._KERNELS[name], {**args, **config.all_kwargs()}))
    return results


def _compiled(result: Result, kernel, launch_kwargs: dict) -> Result:
    """`result` filled in from compiling the launch for its arch, or with the error that stopped it."""
    try:
        metadata, ptx, log = compile_for(kernel, result.arch, launch_kwargs)
    except Exception as error:  # noqa: BLE001 - reported per launch (OutOfResources, PTXASError, ...)
        first_line = (str(error).strip().splitlines() or [""])[0]
        result.error = f"{type(error).__name__}: {first_line[:200]}"
        return result
    return _measured(result, metadata, ptx, log)


def _measured(result: Result, metadata, ptx: str, ptxas_log: str) -> Result:
    registers = re.search(r"Used (\d+) registers", ptxas_log)
    spills = re.search(r"(\d+) bytes spill stores", ptxas_log)
    result.shared_kib = metadata.shared / 1024
    result.registers = int(registers.group(1)) if registers else -1
    result.spill_bytes = int(spills.group(1)) if spills else -1
    result.mma = "wgmma" if "wgmma" in ptx else "mma" if "mma.sync" in ptx else "none"
    return result


def _check_keep_mask(arch: int) -> Result:
    import torch

    from . import configs, flash

    config = configs.KEEP_MASK_CONFIG
    keep = torch.empty(1, dtype=torch.int8)
    return _compiled(Result(arch, "int8", 0, "dropout-mask", "keep_mask", _describe(config), True),
                     flash._keep_mask_kernel,
                     dict(KEEP=keep, Lq=LENGTH, Lk=LENGTH, seed=12345, dropout_p=0.1, **config.all_kwargs()))


def run(archs, dtypes, head_dims, profiles, all_candidates=True, kernels=KERNELS, workers=None) -> list[Result]:
    """Compile every launch of the matrix; `kernels` a subset of KERNELS (the dropout mask is "keep_mask")."""
    jobs = [(a, d, h, p, all_candidates, kernels) for a in archs for d in dtypes for h in head_dims for p in profiles]
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    results = [_check_keep_mask(arch) for arch in archs] if "keep_mask" in kernels else []
    with ProcessPoolExecutor(workers) if workers > 1 else contextlib.nullcontext() as pool:
        batches = pool.map(_check_one, jobs) if pool else map(_check_one, jobs)
        for job, batch in zip(jobs, batches):
            results.extend(batch)
            print(f"  compiled sm_{job[0]} {job[1]} d={job[2]} {job[3]}: {len(batch)} launches", file=sys.stderr,
                  flush=True)
    return results


def problems(results: list[Result]) -> list[str]:
    model = {name for name, p in PROFILES.items() if p.model}
    return [problem for r in results for problem in r.problems(r.profile in model)]


def _cell(r: Optional[Result]) -> str:
    if r is None:
        return ""
    return "does not compile" if r.error else f"{r.shared_kib:.0f} KiB / {r.registers} / {r.spill_bytes}"


def default_tiles(results: list[Result], dtype: str = "bfloat16") -> str:
    """Markdown: each kernel's default tile (the launch without autotuning; marked * in the candidate summary) per
    arch, head dim and profile, as shared memory / registers per thread / spill-store bytes per thread."""
    rows: dict = {}
    for r in results:
        if r.default and r.dtype == dtype:
            rows.setdefault((r.arch, r.head_dim, list(PROFILES).index(r.profile)), {})[r.kernel] = r
    lines = [f"| arch | d | profile ({dtype}) | forward | dK/dV (+ d table) | dQ |", "|---|---|---|---|---|---|"]
    for (arch, head_dim, profile), kernels in sorted(rows.items()):
        lines.append(f"| sm_{arch} | {head_dim} | {list(PROFILES)[profile]} | "
                     + " | ".join(_cell(kernels.get(k)) for k in ATTENTION_KERNELS) + " |")
    return "\n".join(lines)


def candidate_summary(results: list[Result]) -> str:
    """Markdown: every candidate tile per arch, head dim and kernel, over all profiles and dtypes compiled."""
    model = {name for name, p in PROFILES.items() if p.model}
    groups: dict = {}
    for r in results:
        if r.kernel in ATTENTION_KERNELS:
            groups.setdefault((r.arch, r.head_dim, ATTENTION_KERNELS.index(r.kernel), r.config), []).append(r)
    lines = ["| arch | d | kernel | tile (M x N / warps / stages) | max shared KiB | max regs | max spill B, model "
             "profiles | max spill B, any | MMA | failed |", "|---|---|---|---|---|---|---|---|---|---|"]
    for (arch, head_dim, kernel, config), rs in sorted(groups.items()):
        ok = [r for r in rs if not r.error]
        model_spills = [r.spill_bytes for r in ok if r.profile in model]
        lines.append(
            f"| sm_{arch} | {head_dim} | {ATTENTION_KERNELS[kernel]} | {config}{'*' if rs[0].default else ''} | "
            f"{max((r.shared_kib for r in ok), default=0):.0f} | {max((r.registers for r in ok), default=0)} | "
            f"{max(model_spills, default=0)} | {max((r.spill_bytes for r in ok), default=0)} | "
            f"{'/'.join(sorted({r.mma for r in ok}))} | {len(rs) - len(ok)} of {len(rs)} |")
    return "\n".join(lines)


def table(results: list[Result]) -> str:
    """Markdown: one row per launch; the default candidate marked with *."""
    lines = ["| arch | dtype | d | profile | kernel | config | shared KiB | regs | spill B | MMA |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        cells = ["does not compile: " + r.error, "", "", ""] if r.error else [
            f"{r.shared_kib:.0f}", str(r.registers), str(r.spill_bytes), r.mma]
        lines.append(f"| sm_{r.arch} | {r.dtype} | {r.head_dim} | {r.profile} | {r.kernel} | "
                     f"{r.config}{'*' if r.default else ''} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="the suite's subset (the matrix options below are then ignored): " + json.dumps(QUICK))
    parser.add_argument("--archs", type=int, nargs="+", default=sorted(SHARED_LIMIT), choices=sorted(SHARED_LIMIT))
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16", "float32"],
                        choices=["bfloat16", "float16", "float32"], help="float32: its one fixed tile, no spill rule")
    parser.add_argument("--head-dims", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--profiles", nargs="+", default=list(PROFILES), choices=list(PROFILES))
    parser.add_argument("--workers", type=int, default=None, help="compile processes (default: one per core)")
    parser.add_argument("--json", help="also write every result to this file")
    parser.add_argument("--every-launch", action="store_true", help="print one row per launch, not the summaries")
    args = parser.parse_args(argv)

    # Triton 3.9 warns unless this is set; 1 is its default (FMA contraction on), the one a GPU run compiles with.
    # Read when a kernel is compiled, so setting it after triton's import (through .profiles) is in time.
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import triton

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("error: unset TRITON_INTERPRET: the compile check needs Triton's compiler, not its interpreter",
              file=sys.stderr)
        return 2
    if not triton.__version__.startswith(TRITON_VERSION):
        print(f"error: the compile check uses Triton's private compile API as of {TRITON_VERSION}x; this is triton "
              f"{triton.__version__} (pip install 'triton=={TRITON_VERSION}0')", file=sys.stderr)
        return 2
    bad_dims = [d for d in args.head_dims if not 16 <= d <= 128]
    if bad_dims:
        print(f"error: --head-dims must be within 16..128, got {bad_dims}", file=sys.stderr)
        return 2
    matrix = QUICK if args.quick else dict(archs=args.archs, dtypes=args.dtypes, head_dims=args.head_dims,
                                           profiles=args.profiles, all_candidates=True)
    results = run(**matrix, workers=args.workers)
    if args.every_launch:
        print(table(results))
    else:
        print(default_tiles(results) + "\n\n" + candidate_summary(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=1)
    found = problems(results)
    for problem in found:
        print("FAIL " + problem)
    print(f"{len(results)} launches compiled for {', '.join(f'sm_{a}' for a in matrix['archs'])}: "
          f"{len(found)} problems")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
