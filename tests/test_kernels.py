"""Fused Triton attention against the float64 reference backend: outputs and every gradient (dq, dk, dv, d table).

On CPU the kernels run under TRITON_INTERPRET=1 (set in conftest) in fp32 at small shapes, with 16x16 blocks so
lengths span several blocks and end inside one. Outputs are poisoned with NaN before every launch. With CUDA, the
same cases also run in bf16/fp16 against the FlashAttention criterion (error at most a few times that of a
same-precision torch reference).
"""
import math

import pytest
import torch

from suformer.models import build_model
from suformer.attention import AttentionMask, Rotary, T5RelativeBias, attention

from numerics import rel_err

triton = pytest.importorskip("triton")
from suformer.attention.triton import dropout_keep_mask, flash, flash_attention  # noqa: E402

pytestmark = pytest.mark.kernels
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(flash, "POISON_OUTPUTS", True)


def _padding(batch, length, real_lengths):
    return torch.arange(length)[None, :] < torch.tensor(real_lengths)[:, None]


def _segments(length, sources, targets):
    """UniLM segment ids: `sources[b]` zeros, `targets[b]` ones, then padding (0)."""
    rows = [[0] * s + [1] * t + [0] * (length - s - t) for s, t in zip(sources, targets)]
    return torch.tensor(rows)


def _documents(runs):
    """Document ids of packed rows from run lengths: ids 1, 2, 1, 2, ... (a repeated id is another document)."""
    return torch.tensor([[1 + i % 2 for i, n in enumerate(row) for _ in range(n)] for row in runs])


def _run(backend, dtype, device, inputs, case, grad_out):
    """Output and gradients (q, k, v, table) of one attention call."""
    q, k, v, table = (x.detach().to(device=device, dtype=dtype).requires_grad_() for x in inputs)
    position = case.get("position")
    if position == "t5":
        position = T5RelativeBias(table, bidirectional=case["bidirectional"], max_distance=case["max_distance"])
    elif position == "rope":
        position = Rotary()
    mask = case.get("mask")
    if mask is not None:
        mask = AttentionMask(
            key_padding=None if mask.key_padding is None else mask.key_padding.to(device),
            causal=mask.causal, window=mask.window,
            segment_ids=None if mask.segment_ids is None else mask.segment_ids.to(device),
            document_ids=None if mask.document_ids is None else mask.document_ids.to(device),
        )
    out = attention(
        q, k, v, position=position, mask=mask, scale=case.get("scale", 1.0), query_offset=case.get("offset", 0),
        logn_base=case.get("logn_base"), backend=backend,
    )
    out.backward(grad_out.to(device=device, dtype=dtype))
    grads = [x.grad for x in (q, k, v)] + ([table.grad] if case.get("position") == "t5" else [])
    return [out] + grads


def _inputs(case):
    B, H, Lq, Lk, D = case["shape"]
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, H, n, D, generator=gen, dtype=torch.float64) for n in (Lq, Lk, Lk))
    table = torch.randn(32, H, generator=gen, dtype=torch.float64)
    return (q, k, v, table), torch.randn(B, H, Lq, D, generator=gen, dtype=torch.float64)


CASES = {
    "plain": dict(shape=(2, 2, 37, 37, 64), scale=0.125),
    "plain-padded-hd128": dict(shape=(2, 2, 35, 35, 128), scale=128**-0.5,
                               mask=AttentionMask(key_padding=_padding(2, 35, [35, 20]))),
    "odd-head-dim-24": dict(shape=(2, 1, 21, 21, 24), scale=0.2, mask=AttentionMask(key_padding=_padding(2, 21, [21, 9]))),
    "t5-encoder-padded": dict(shape=(2, 2, 45, 45, 64), position="t5", bidirectional=True, max_distance=20,
                              mask=AttentionMask(key_padding=_padding(2, 45, [45, 29]))),
    "t5-decoder-causal": dict(shape=(2, 2, 41, 41, 64), position="t5", bidirectional=False, max_distance=24,
                              mask=AttentionMask(key_padding=_padding(2, 41, [41, 30]), causal=True)),
    # bert4keras T5 PEGASUS cross-attention: bias at max(i - j, 0), decoder length != encoder length.
    "t5-cross-attention": dict(shape=(2, 2, 19, 43, 64), position="t5", bidirectional=False, max_distance=24,
                               mask=AttentionMask(key_padding=_padding(2, 43, [43, 26]))),
    "t5-default-buckets-far-field": dict(shape=(1, 2, 150, 150, 32), position="t5", bidirectional=True,
                                         max_distance=128),
    "t5-causal-window": dict(shape=(2, 2, 40, 40, 32), position="t5", bidirectional=False, max_distance=24,
                             mask=AttentionMask(causal=True, window=7)),
    "window": dict(shape=(2, 2, 40, 40, 32), scale=0.2, mask=AttentionMask(window=9)),
    "rope-padded": dict(shape=(2, 2, 37, 37, 64), position="rope", scale=0.125,
                        mask=AttentionMask(key_padding=_padding(2, 37, [37, 22]))),
    "rope-unilm": dict(shape=(2, 2, 38, 38, 64), position="rope", scale=0.125,
                       mask=AttentionMask(key_padding=_padding(2, 38, [38, 28]), segment_ids=_segments(38, [15, 10], [23, 18]))),
    "rope-logn": dict(shape=(2, 2, 33, 33, 32), position="rope", scale=32**-0.5, logn_base=16,
                      mask=AttentionMask(key_padding=_padding(2, 33, [33, 12]))),
    # Decoding with a KV cache: 4 new queries at positions 33..36 against 37 cached keys.
    "rope-causal-kv-cache": dict(shape=(2, 2, 4, 37, 64), position="rope", scale=0.125, offset=33,
                                 mask=AttentionMask(causal=True)),
    "t5-decoder-kv-cache": dict(shape=(2, 2, 3, 30, 32), position="t5", bidirectional=False, max_distance=24,
                                offset=27, mask=AttentionMask(causal=True)),
    "unilm-kv-cache": dict(shape=(2, 2, 5, 30, 32), position="rope", scale=0.2, offset=25,
                           mask=AttentionMask(segment_ids=_segments(30, [12, 9], [18, 21]))),
    # Packed documents (each a run of ids, the same id later on another document), across 16-key tiles.
    "rope-packed-documents": dict(shape=(2, 2, 48, 48, 32), position="rope", scale=0.2,
                                  mask=AttentionMask(key_padding=_padding(2, 48, [40, 48]),
                                                     document_ids=_documents([[7, 20, 13, 8], [3, 27, 18]]))),
    "t5-packed-documents": dict(shape=(2, 2, 45, 45, 32), position="t5", bidirectional=True, max_distance=20,
                                mask=AttentionMask(key_padding=_padding(2, 45, [38, 45]),
                                                   document_ids=_documents([[17, 21, 7], [5, 40]]))),
    "unilm-packed-documents": dict(shape=(2, 2, 40, 40, 32), position="rope", scale=0.2,
                                   mask=AttentionMask(segment_ids=_segments(40, [12, 9], [28, 31]),
                                                      document_ids=_documents([[20, 20], [9, 31]]))),
    # A sequence with no real key at all: its rows must come out as zeros with zero gradients, not NaN.
    "fully-masked-rows": dict(shape=(2, 2, 20, 20, 32), position="t5", bidirectional=True, max_distance=20,
                              mask=AttentionMask(key_padding=_padding(2, 20, [20, 0]))),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("backend", ["triton"])
def test_matches_float64_reference(name, backend):
    case = CASES[name]
    inputs, grad_out = _inputs(case)
    expected = _run("reference", torch.float64, "cpu", inputs, case, grad_out)
    got = _run(backend, torch.float32, DEVICE, inputs, case, grad_out)
    for label, g, e in zip(["out", "dq", "dk", "dv", "dtable"], got, expected):
        assert torch.isfinite(g).all(), f"{name}: {label} has NaN/inf (unwritten output?)"
        assert rel_err(g.double().cpu(), e) < 2e-5, f"{name}: {label} differs"


@pytest.mark.parametrize("name", ["rope-padded", "rope-unilm", "rope-causal-kv-cache"])
def test_rope_outside_kernel_matches_reference(name):
    case = CASES[name]
    inputs, grad_out = _inputs(case)
    expected = _run("reference", torch.float64, "cpu", inputs, case, grad_out)
    got = _run("triton_rope_outside", torch.float32, DEVICE, inputs, case, grad_out)
    for g, e in zip(got, expected):
        assert rel_err(g.double().cpu(), e) < 2e-5


AUTOTUNE_CASES = {  # two 64-key tiles: the second reads its UniLM query start at grain 4 and writes partials row 1
    "t5": dict(shape=(1, 2, 100, 100, 32), position="t5", bidirectional=True, max_distance=20,
               mask=AttentionMask(key_padding=_padding(1, 100, [70]))),
    "unilm": dict(shape=(1, 2, 100, 100, 32), position="rope", scale=0.2,
                  mask=AttentionMask(key_padding=_padding(1, 100, [90]), segment_ids=_segments(100, [30], [60]))),
}


@pytest.mark.parametrize("name", list(AUTOTUNE_CASES))
def test_the_autotuned_launch_path(name, monkeypatch):
    """The GPU's launch path, run by the interpreter: `triton.autotune` over candidates with key tiles of 2 and 4
    grains (configs.KEY_GRAIN). The last candidate (64-key tiles) is made to win, after the others have run in the
    tuning and written more rows of bias-table partials (so those rows must be zeroed again); the result must
    still be the reference's."""
    from suformer.attention.triton import configs

    candidates = [configs._config(16, 32, 1, 1), configs._config(32, 32, 1, 1), configs._config(16, 64, 1, 1)]
    monkeypatch.setitem(configs.GPU_CONFIGS, 90, {kernel: {64: candidates} for kernel in configs.KERNELS})
    monkeypatch.setattr(flash, "_arch", lambda device: 90)
    monkeypatch.setattr(flash, "AUTOTUNE", True)
    flash._autotuned.cache_clear()
    timings = iter(range(100, 0, -1))  # each later candidate "faster": the last one wins
    tuners = [flash._autotuned(kernel, 90, 64) for kernel in configs.KERNELS]
    for tuner in tuners:
        def bench(kernel_call, quantiles):
            kernel_call()  # the candidate really runs, as in Triton's own timing
            return [float(next(timings))] * len(quantiles)
        tuner.__dict__["do_bench"] = bench  # over Triton's cached property (the interpreter has no GPU timer)
        tuner.cache_results = False  # on a GPU: never a disk-cache hit that skips the tuning under test
    try:
        case = AUTOTUNE_CASES[name]
        inputs, grad_out = _inputs(case)
        expected = _run("reference", torch.float64, "cpu", inputs, case, grad_out)
        got = _run("triton", torch.float32, DEVICE, inputs, case, grad_out)
    finally:
        flash._autotuned.cache_clear()
    assert [tuner.best_config.kwargs for tuner in tuners] == [{"BLOCK_M": 16, "BLOCK_N": 64}] * 3
    for label, g, e in zip(["out", "dq", "dk", "dv", "dtable"], got, expected):
        assert rel_err(g.double().cpu(), e) < 2e-5, f"{name}: {label} differs"


@pytest.mark.parametrize("blocks", [(16, 32), (32, 16)])
def test_unequal_block_shapes(blocks):
    """Loop bounds and the per-tile bucket reduction must not assume square blocks."""
    case = CASES["t5-decoder-causal"]
    inputs, grad_out = _inputs(case)
    expected = _run("reference", torch.float64, "cpu", inputs, case, grad_out)
    q, k, v, table = (x.detach().float().to(DEVICE).requires_grad_() for x in inputs)
    out = flash_attention(q, k, v, bias=T5RelativeBias(table, False, 24), causal=True,
                          key_padding=case["mask"].key_padding.to(DEVICE), block_sizes=blocks)
    out.backward(grad_out.float().to(DEVICE))
    for g, e in zip([out, q.grad, k.grad, v.grad, table.grad], expected):
        assert rel_err(g.double().cpu(), e) < 2e-5


def test_dropout_matches_reference_with_the_kernels_mask():
    """In-kernel dropout equals softmax * keep / (1 - p) with the keep mask the kernel draws for that seed, in both
    passes; the kept fraction is 1 - p; another seed draws another mask."""
    B, H, L, D, p = 2, 2, 40, 32, 0.3
    padding = _padding(B, L, [L, 31])
    (q, k, v, _), grad_out = _inputs(dict(shape=(B, H, L, L, D)))
    keep = dropout_keep_mask(1234, (B, H, L, L), p, DEVICE).cpu()
    kept = keep.double().mean().item()
    assert abs(kept - (1 - p)) < 4 * math.sqrt(p * (1 - p) / keep.numel())

    ref = [x.clone().requires_grad_() for x in (q, k, v)]
    scores = (ref[0] @ ref[1].transpose(-1, -2) * 0.2).masked_fill(~padding[:, None, None, :], float("-inf"))
    expected_out = (torch.softmax(scores, -1) * keep / (1 - p)) @ ref[2]
    expected_out.backward(grad_out)

    got = [x.float().to(DEVICE).requires_grad_() for x in (q, k, v)]
    out = flash_attention(*got, scale=0.2, key_padding=padding.to(DEVICE), dropout_p=p, dropout_seed=1234)
    out.backward(grad_out.float().to(DEVICE))
    for g, e in zip([out] + [x.grad for x in got], [expected_out] + [x.grad for x in ref]):
        assert rel_err(g.double().cpu(), e) < 2e-5
    other = flash_attention(*(x.detach() for x in got), scale=0.2, key_padding=padding.to(DEVICE), dropout_p=p,
                            dropout_seed=99)
    assert rel_err(other.double().cpu(), expected_out.detach()) > 0.05


def test_bad_inputs_are_rejected_with_a_message():
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="expected q"):
        flash_attention(q, torch.randn(1, 3, 8, 16), torch.randn(1, 3, 8, 16))
    with pytest.raises(TypeError, match="float32/float16/bfloat16"):
        flash_attention(q.double(), q.double(), q.double())
    with pytest.raises(ValueError, match="bias table"):
        flash_attention(q, q, q, bias=T5RelativeBias(torch.zeros(32, 5), True))


def _model_step(model, batch):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family,unilm", [("t5_pegasus", False), ("roformer_v2", False), ("roformer_v2", True)])
def test_tiny_models_train_through_the_kernels(family, unilm):
    """One training step of a tiny model: the same loss and the same gradient for every parameter as the float64
    reference backend (T5 in its default bert4keras mode, so the decoder cross-attention bias is exercised)."""
    vocab = 300
    reference = build_model(family, "tiny", vocab_size=vocab, dropout=0.0, attention_backend="reference").double()
    fused = build_model(family, "tiny", vocab_size=vocab, dropout=0.0, attention_backend="triton").to(DEVICE)
    fused.load_state_dict({n: t.float() for n, t in reference.state_dict().items()})
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(5, vocab, (2, 27), generator=gen)
    ids[1, 19:] = 0  # padding
    if family == "t5_pegasus":
        labels = torch.randint(5, vocab, (2, 13), generator=gen)
        labels[1, 8:] = -100
        batch = dict(input_ids=ids, labels=labels)
    else:
        labels = torch.where(torch.rand(ids.shape, generator=gen) < 0.3, ids, -100)
        batch = dict(input_ids=ids, labels=labels)
        if unilm:
            batch.update(token_type_ids=(torch.arange(27) >= 12).long().expand(2, -1) * (ids != 0), unilm=True)
    loss_ref, grads_ref = _model_step(reference, batch)
    loss, grads = _model_step(fused, {n: t.to(DEVICE) if torch.is_tensor(t) else t for n, t in batch.items()})
    assert abs(loss.item() - loss_ref.item()) < 1e-5 * abs(loss_ref.item())
    assert grads.keys() == grads_ref.keys()
    for name, g in grads.items():
        assert rel_err(g.double().cpu(), grads_ref[name]) < 1e-4, name


@pytest.mark.skipif(DEVICE != "cuda", reason="bf16/fp16 kernels need a GPU (the interpreter has no bf16 dot)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["t5-encoder-padded", "t5-decoder-causal", "t5-cross-attention", "rope-unilm",
                                  "t5-default-buckets-far-field"])
def test_half_precision_on_gpu(name, dtype):
    """FlashAttention's criterion: error vs float64 at most 3x that of the same-precision torch reference (+ eps)."""
    case = CASES[name]
    inputs, grad_out = _inputs(case)
    expected = _run("reference", torch.float64, "cpu", inputs, case, grad_out)
    baseline = _run("reference", dtype, DEVICE, inputs, case, grad_out)
    got = _run("triton", dtype, DEVICE, inputs, case, grad_out)
    for label, g, b, e in zip(["out", "dq", "dk", "dv", "dtable"], got, baseline, expected):
        err = (g.double().cpu() - e).abs().max().item()
        base_err = (b.double().cpu() - e).abs().max().item()
        assert err <= 3 * base_err + 1e-3 * e.abs().max().item(), f"{name} {dtype}: {label} {err:.2e} vs {base_err:.2e}"
