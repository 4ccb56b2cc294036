"""GPU benchmark of the fused attention kernels against what users would otherwise run.

    python benchmarks/attention.py                       # kernels: hd 64/128, lengths 512..8192, fwd and fwd+bwd
    python benchmarks/attention.py --model               # plus a T5 PEGASUS base training step, ours vs SDPA
    python benchmarks/attention.py --lengths 1024 --head-dims 64 --reps 5   # a quick look
    TRITON_INTERPRET=1 python benchmarks/attention.py --smoke   # CPU: tiny shapes, checks the script runs

Needs only torch and triton (run from the repository root). Writes a table to stdout and all figures as JSON
(default benchmarks/results/attention_<device>.json).

Shapes follow FlashAttention's benchmarks: hidden size 2048 (32 heads at hd 64, 16 at hd 128) and 16k tokens per
batch (batch = 16384 / length), bf16. TFLOP/s count model FLOPs: 4*B*H*Lq*Lk*D forward, 2.5x that for the backward
(3.5x for forward+backward), halved when causal; bias, RoPE, masking and softmax are not counted.
Each figure is the median of `--reps` timed calls (CUDA events) after warm-up, every call on freshly drawn random
inputs (never zeros). Candidates per scenario:

  T5 bias (encoder: bidirectional; decoder: causal), learnable [32, H] table, no 1/sqrt(d):
    sdpa-flash (no bias)   torch SDPA on the flash backend without any bias: the speed a bias-free model gets
    sdpa+bias              SDPA with the bias materialised as [1, H, L, L] every call (transformers' T5 path)
    flex                   FlexAttention (torch.compile) with the table as a score_mod; its backward reaches the
                           table through atomics
    ours                   suformer's Triton kernel: bucket and bias in-kernel, d(table) reduced per block
  RoPE (RoFormerV2: bidirectional, scale 1/sqrt(d)):
    sdpa-flash+rope        RoPE applied by torch, then SDPA flash
    flex+rope              RoPE applied by torch, then FlexAttention
    ours-rope-outside      RoPE applied by torch, then our kernel
    ours-rope-in-kernel    RoPE on q/k tiles inside our kernel
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from suformer.models import build_model  # noqa: E402
from suformer.attention import (  # noqa: E402
    AttentionMask, Rotary, T5RelativeBias, attention, relative_position_bucket, rotate_qk,
)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def timed(fn, make_inputs, reps: int, warmup: int) -> float:
    """Median milliseconds of fn(*inputs) over `reps` calls, each on fresh inputs, after `warmup` calls."""
    for _ in range(warmup):
        fn(*make_inputs())
    times = []
    for _ in range(reps):
        inputs = make_inputs()
        if CUDA:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*inputs)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn(*inputs)
            times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


def make_inputs_factory(batch, heads, length, head_dim, dtype, requires_grad: bool):
    """Fresh q, k, v, output gradient and [32, H] bias table per call."""
    def make():
        q, k, v, grad = (torch.randn(batch, heads, length, head_dim, device=DEVICE, dtype=dtype) for _ in range(4))
        table = torch.randn(32, heads, device=DEVICE, dtype=torch.float32)
        for x in (q, k, v, table):
            x.requires_grad_(requires_grad)
        return q, k, v, table, grad
    return make


def with_backward(forward, backward: bool):
    """Forward alone runs as inference (no autograd graph); forward+backward includes the backward pass."""
    def run(q, k, v, table, grad):
        if not backward:
            with torch.no_grad():
                return forward(q, k, v, table)
        out = forward(q, k, v, table)
        out.backward(grad)
        return out
    return run


# --------------------------------------------------------------------------------------------- candidates


def sdpa_flash(causal, scale, rope=False):
    def forward(q, k, v, table):
        if rope:
            q, k = rotate_qk(q, k, Rotary(), 0)
        if CUDA:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    return forward


def ours_or_sdpa_bias(backend, causal):
    """Our model-facing attention with a fresh T5 description per call (the SDPA backend materialises the bias)."""
    def forward(q, k, v, table):
        position = T5RelativeBias(table, bidirectional=not causal)
        return attention(q, k, v, position=position, mask=AttentionMask(causal=causal), scale=1.0, backend=backend)
    return forward


def ours_rope(backend, scale):
    def forward(q, k, v, table):
        return attention(q, k, v, position=Rotary(), scale=scale, backend=backend)
    return forward


_FLEX_CACHE: dict = {}


def flex(causal, scale, length, bias: bool, rope=False):
    """FlexAttention, compiled once per shape; the T5 table is read through a no-grad bucket lookup."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if "compiled" not in _FLEX_CACHE:
        _FLEX_CACHE["compiled"] = torch.compile(flex_attention, dynamic=False)
    compiled = _FLEX_CACHE["compiled"]
    block_mask = None
    if causal:
        block_mask = create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, length, length,
                                       device=DEVICE)
    distance = torch.arange(-(length - 1), length, device=DEVICE)
    lut = relative_position_bucket(distance, bidirectional=not causal).to(DEVICE)

    def t5_score_mod(table):
        def score_mod(score, b, h, q_idx, kv_idx):
            return score + table[lut[kv_idx - q_idx + length - 1], h].to(score.dtype)
        return score_mod

    def forward(q, k, v, table):
        if rope:
            q, k = rotate_qk(q, k, Rotary(), 0)
        return compiled(q, k, v, score_mod=t5_score_mod(table) if bias else None, block_mask=block_mask, scale=scale)
    return forward


def scenarios(length, head_dim):
    t5 = {}
    for causal, name in [(False, "t5-encoder"), (True, "t5-decoder-causal")]:
        t5[name] = (causal, {
            "sdpa-flash (no bias)": sdpa_flash(causal, 1.0),
            "sdpa+bias": ours_or_sdpa_bias("sdpa", causal),
            "flex": flex(causal, 1.0, length, bias=True),
            "ours": ours_or_sdpa_bias("triton", causal),
        })
    scale = head_dim**-0.5
    rope = {"rope": (False, {
        "sdpa-flash+rope": sdpa_flash(False, scale, rope=True),
        "flex+rope": flex(False, scale, length, bias=False, rope=True),
        "ours-rope-outside": ours_rope("triton_rope_outside", scale),
        "ours-rope-in-kernel": ours_rope("triton_rope_in_kernel", scale),
    })}
    return {**t5, **rope}


BASELINES = {"t5-encoder": "flex", "t5-decoder-causal": "flex", "rope": "sdpa-flash+rope"}


def verify(args, length=256, batch=2):
    """Before timing: every candidate's forward against the float32 reference backend at a small shape, so no
    baseline is timed computing something else. Returns {scenario/candidate/hd: max abs error}."""
    errors = {}
    for head_dim in args.head_dims:
        heads = args.hidden // head_dim
        q, k, v, table, _ = make_inputs_factory(batch, heads, length, head_dim, args.dtype, requires_grad=False)()
        for scenario, (causal, candidates) in scenarios(length, head_dim).items():
            position = Rotary() if scenario == "rope" else T5RelativeBias(table, bidirectional=not causal)
            scale = head_dim**-0.5 if scenario == "rope" else 1.0
            with torch.no_grad():
                expected = attention(*(x.float() for x in (q, k, v)), position=position, scale=scale,
                                     mask=AttentionMask(causal=causal), backend="reference")
                for name, forward in candidates.items():
                    if name == "sdpa-flash (no bias)":
                        continue  # computes attention without the bias on purpose
                    got = forward(q, k, v, table).float()
                    errors[f"{scenario}/{name}/hd{head_dim}"] = (got - expected).abs().max().item()
    tolerance = 1e-4 if args.dtype == torch.float32 else 0.1
    for key, err in errors.items():
        print(f"check {key:<45} max |err| vs reference {err:.2e}" + ("   <-- MISMATCH" if err > tolerance else ""))
    return errors


def kernel_rows(args):
    rows = []
    for head_dim in args.head_dims:
        heads = args.hidden // head_dim
        for length in args.lengths:
            batch = max(1, args.tokens // length)
            for scenario, (causal, candidates) in scenarios(length, head_dim).items():
                flops = 4 * batch * heads * length * length * head_dim * (0.5 if causal else 1.0)
                for backward in (False, True):
                    mode = "fwd+bwd" if backward else "fwd"
                    make = make_inputs_factory(batch, heads, length, head_dim, args.dtype, requires_grad=backward)
                    for name, forward in candidates.items():
                        row = dict(scenario=scenario, mode=mode, head_dim=head_dim, length=length, batch=batch,
                                   heads=heads, candidate=name)
                        try:
                            ms = timed(with_backward(forward, backward), make, args.reps, args.warmup)
                            row.update(ms=ms, tflops=flops * (3.5 if backward else 1.0) / ms / 1e9)
                        except Exception as error:  # an OOM or unsupported case is a row, not a crash
                            row.update(ms=None, tflops=None, error=f"{type(error).__name__}: {str(error)[:120]}")
                        if CUDA:
                            torch.cuda.empty_cache()
                        rows.append(row)
                        print(_format_row(row), flush=True)
    _add_ratios(rows)
    return rows


def _add_ratios(rows):
    def key(r):
        return r["scenario"], r["mode"], r["head_dim"], r["length"]
    by = {}
    for r in rows:
        by.setdefault(key(r), {})[r["candidate"]] = r
    for group in by.values():
        for r in group.values():
            for ref in {BASELINES[r["scenario"]], "sdpa-flash (no bias)"} & group.keys():
                base = group[ref]
                if r["ms"] and base["ms"]:
                    r[f"x_vs_{ref}"] = base["ms"] / r["ms"]


def _format_row(r):
    speed = f"{r['tflops']:7.1f} TFLOP/s {r['ms']:9.3f} ms" if r["ms"] else f"n/a ({r.get('error')})"
    return (f"{r['scenario']:<18} {r['mode']:<7} hd{r['head_dim']:<4} L={r['length']:<5} B={r['batch']:<3} "
            f"{r['candidate']:<22} {speed}")


def print_table(rows):
    print("\n| scenario | mode | hd | L | candidate | TFLOP/s | ms | x vs baseline | x vs sdpa-flash (no bias) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        base = BASELINES[r["scenario"]]
        ratio = r.get(f"x_vs_{base}")
        flash = r.get("x_vs_sdpa-flash (no bias)")
        tflops = f"{r['tflops']:.1f}" if r["tflops"] else "n/a"
        ms = f"{r['ms']:.3f}" if r["ms"] else r.get("error", "n/a")
        print(f"| {r['scenario']} | {r['mode']} | {r['head_dim']} | {r['length']} | {r['candidate']} | {tflops} | "
              f"{ms} | {f'{ratio:.2f}x ({base})' if ratio else ''} | {f'{flash:.2f}x' if flash else ''} |")


def model_step_row(args, backend):
    """Median time of one T5 PEGASUS training step (bf16 autocast on CUDA, AdamW) with the given backend."""
    torch.manual_seed(0)
    model = build_model("t5_pegasus", args.model_preset, dropout=0.1, attention_backend=backend).to(DEVICE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=CUDA)
    vocab = model.config.vocab_size

    def make():
        ids = torch.randint(106, vocab, (args.model_batch, args.encoder_length), device=DEVICE)
        labels = torch.randint(106, vocab, (args.model_batch, args.decoder_length), device=DEVICE)
        return ids, labels

    def step(ids, labels):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=CUDA):
            loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()

    row = dict(scenario="t5-pegasus-step", preset=args.model_preset, backend=backend, batch=args.model_batch,
               encoder_length=args.encoder_length, decoder_length=args.decoder_length)
    try:
        if CUDA:
            torch.cuda.reset_peak_memory_stats()
        ms = timed(step, make, args.reps, args.warmup)
        tokens = args.model_batch * (args.encoder_length + args.decoder_length)
        row.update(ms=ms, tokens_per_s=tokens / ms * 1e3,
                   peak_gib=torch.cuda.max_memory_allocated() / 2**30 if CUDA else None)
    except Exception as error:
        row.update(ms=None, error=f"{type(error).__name__}: {str(error)[:120]}")
    return row


def model_rows(args):
    """T5 PEGASUS training step, encoder 512 / decoder 128 by default: ours vs SDPA with the materialised bias."""
    rows = []
    for backend in ("sdpa", "triton"):
        rows.append(model_step_row(args, backend))
        if CUDA:
            torch.cuda.empty_cache()
    if rows[0].get("ms") and rows[1].get("ms"):
        rows[1]["x_vs_sdpa"] = rows[0]["ms"] / rows[1]["ms"]
    print("\n| model step | backend | batch | enc/dec | ms/step | tokens/s | peak GiB | x vs sdpa |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ms = f"{r['ms']:.1f}" if r.get("ms") else r.get("error")
        tps = f"{r['tokens_per_s']:,.0f}" if r.get("ms") else ""
        peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") else ""
        x = f"{r['x_vs_sdpa']:.2f}x" if r.get("x_vs_sdpa") else ""
        print(f"| T5 PEGASUS {r['preset']} | {r['backend']} | {r['batch']} | {r['encoder_length']}/{r['decoder_length']}"
              f" | {ms} | {tps} | {peak} | {x} |")
    return rows


def environment():
    import triton

    return dict(
        date=date.today().isoformat(), device=torch.cuda.get_device_name() if CUDA else platform.processor() or "cpu",
        torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
        interpreter=os.environ.get("TRITON_INTERPRET") == "1", python=platform.python_version(),
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    parser.add_argument("--hidden", type=int, default=2048, help="heads = hidden / head_dim")
    parser.add_argument("--tokens", type=int, default=16384, help="batch = tokens / length")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--model", action="store_true", help="also time a T5 PEGASUS training step")
    parser.add_argument("--model-preset", default="base")
    parser.add_argument("--model-batch", type=int, default=64)
    parser.add_argument("--encoder-length", type=int, default=512)
    parser.add_argument("--decoder-length", type=int, default=128)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes in fp32 (CPU, under TRITON_INTERPRET=1)")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    if args.smoke:
        args.head_dims, args.lengths, args.hidden, args.tokens, args.dtype = [32], [64], 64, 128, "float32"
        args.reps, args.warmup, args.model_preset, args.model_batch = 1, 0, "tiny", 2
        args.encoder_length, args.decoder_length = 32, 16
    args.dtype = getattr(torch, args.dtype)

    env = environment()
    print(json.dumps(env))
    results = dict(environment=env, args={k: str(v) for k, v in vars(args).items()},
                   checks=verify(args, length=64 if args.smoke else 256))
    results["kernels"] = kernel_rows(args)
    print_table(results["kernels"])
    if args.model:
        results["model"] = model_rows(args)
    output = args.output or Path(__file__).parent / "results" / f"attention_{env['device'].replace(' ', '_')}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=1))
    print(f"\nwrote {output}")


if __name__ == "__main__":
    main()
