"""The efficiency levers against independent references: FLOPs formulas against torch's FlopCounterMode on real
batches of every objective, packed rows against the same examples unpacked, activation checkpointing against the
run without it (float64 gradients), the Triton attention as a custom op (torch.library.opcheck), torch.compile
against eager (graph breaks counted by torch._dynamo.explain), the peak table."""
import copy

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from suformer.config import DataSection
from suformer.models import build_model
from suformer.pretrain.batches import Batching, collate
from suformer.pretrain.data.objectives import OBJECTIVES
from suformer.tokenizer import Tokenizer
from suformer.train.efficiency import apply_efficiency, set_activation_checkpointing
from suformer.train.flops import PEAKS, device_peak

FAMILY = {"pegasus": "t5_pegasus", "mlm": "roformer_v2", "unilm": "roformer_v2"}
DATA = DataSection(max_source_len=96, max_target_len=32, max_len=96, chunk_chars=160, unit_chars=24)


@pytest.fixture(scope="module")
def examples(news, vocab_file, char_vocab_file):
    """Six real examples of each objective, from People's Daily paragraphs: the shortest, the longest and four
    lengths between."""
    made = {}
    for name, objective in OBJECTIVES.items():
        tokenizer = Tokenizer(vocab_file if objective.pre_tokenize else char_vocab_file,
                              pre_tokenize=objective.pre_tokenize)
        rows = sorted((row for document in news[:300] for row in objective.examples(document, DATA, tokenizer)),
                      key=lambda row: row["num_tokens"])
        made[name] = [rows[round(q * (len(rows) - 1) / 5)] for q in range(6)], len(tokenizer)
    return made


def _batches(examples, name):
    """(label, batch): the objective's rows padded in one micro-batch, and packed where the objective packs."""
    rows, _ = examples[name]
    yield "padded", collate(name, rows)
    if OBJECTIVES[name].packs:
        packing = Batching(name, "packed", len(rows), capacity=OBJECTIVES[name].longest(DATA))
        yield "packed", packing.collate(rows, packing.plan([(r["num_tokens"],) for r in rows], "test")[0])


def _model(name, vocab_size, backend="sdpa", **overrides):
    return build_model(FAMILY[name], "tiny", vocab_size=vocab_size, attention_backend=backend, dropout=0.0,
                       **overrides)


def _counted(model, batch, backward=False) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        out = model(**batch)
        if backward:
            out.loss.backward()
    return counter.get_total_flops()


def _alone(name, batch) -> list[dict]:
    """Each example of a batch on its own, without padding: a row's real tokens, or a packed row's documents."""
    single = []
    for r in range(batch["input_ids"].shape[0]):
        documents = batch["document_ids"][r] if "document_ids" in batch else (batch["input_ids"][r] != 0).long()
        for d in documents.unique():
            if d == 0:
                continue
            keep = documents == d
            decoder = ("decoder_input_ids", "labels") if "decoder_input_ids" in batch else ()
            part = {k: v[r][keep][None] for k, v in batch.items()
                    if torch.is_tensor(v) and k != "document_ids" and k not in decoder}
            if decoder:  # T5: the decoder's real positions too
                real = batch["decoder_input_ids"][r] != 0
                real[0] = True
                part["decoder_input_ids"] = batch["decoder_input_ids"][r][real][None]
                part["labels"] = batch["labels"][r][real][None]
            single.append({**part, **({"unilm": True} if batch.get("unilm") else {})})
    return single


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_formula_flops_match_the_counter_on_every_objective(examples, name):
    """`computed` FLOPs are what FlopCounterMode counts on the padded batch (forward, and forward + backward = 3
    forwards); `real` FLOPs are what it counts on each example alone, without padding. Through the reference
    attention, whose products are matmuls the counter sees (it does not count CPU SDPA's fused kernel)."""
    _, vocab_size = examples[name]
    model = _model(name, vocab_size, backend="reference")
    for label, batch in _batches(examples, name):
        computed, real = model.forward_flops(batch, "computed"), model.forward_flops(batch, "real")
        assert _counted(model, batch) == pytest.approx(computed, rel=0.05), label
        assert _counted(model, batch, backward=True) == pytest.approx(3 * computed, rel=0.05), label
        assert sum(_counted(model, alone) for alone in _alone(name, batch)) == pytest.approx(real, rel=0.05), label
        assert real < computed


def test_packed_rows_give_each_example_the_loss_and_logits_it_has_alone(examples):
    """Document masking: an example packed with others (RoPE positions running on through the row) predicts
    exactly what it predicts on its own; the packed loss is the mean over the same predicted tokens."""
    for name in ("mlm", "unilm"):
        rows, vocab_size = examples[name]
        model = _model(name, vocab_size, backend="reference").double().eval()
        (_, padded), (_, packed) = _batches(examples, name)
        if name == "mlm":  # (UniLM's examples are sized to fill a row)
            assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]  # several examples share a row
        with torch.no_grad():
            packed_out, padded_out = model(**packed), model(**padded)
            torch.testing.assert_close(packed_out.loss, padded_out.loss)
            for alone in _alone(name, packed):
                ids = alone["input_ids"][0]
                r, start = next((r, t) for r in range(packed["input_ids"].shape[0])
                                for t in range(packed["input_ids"].shape[1] - len(ids) + 1)
                                if torch.equal(packed["input_ids"][r, t:t + len(ids)], ids))
                torch.testing.assert_close(packed_out.logits[r, start:start + len(ids)], model(**alone).logits[0])


def _short(batch):
    """Two rows of at most 24 tokens: the Triton interpreter is slow."""
    return {key: value[:2, :24] if torch.is_tensor(value) else value for key, value in batch.items()}


def _grads(model, batch):
    torch.manual_seed(3)  # dropout masks: the same draws in both runs
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("backend", ["reference", "sdpa", "triton"])
@pytest.mark.parametrize("name", ["pegasus", "mlm"])
def test_activation_checkpointing_leaves_loss_and_gradients_unchanged(examples, name, backend):
    """float64, dropout on: full and selective checkpointing recompute the same activations (and masks)."""
    if backend == "triton":
        pytest.importorskip("triton")
    rows, vocab_size = examples[name]
    dtype = torch.float32 if backend == "triton" else torch.float64  # the interpreter computes in fp32
    model = build_model(FAMILY[name], "tiny", vocab_size=vocab_size, attention_backend=backend,
                        dropout=0.1).to(dtype)
    batch = collate(name, rows[:3])
    if backend == "triton":
        batch = _short(batch)
    loss, expected = _grads(copy.deepcopy(model), batch)
    for mode in ("full", "selective"):
        checkpointed = copy.deepcopy(model)
        assert sum(set_activation_checkpointing(checkpointed, mode, every=2)) > 0
        got_loss, got = _grads(checkpointed, batch)
        torch.testing.assert_close(got_loss, loss)
        for key, grad in expected.items():
            torch.testing.assert_close(got[key], grad, msg=f"{mode}: {key}")


def test_activation_checkpointing_drops_the_activations_it_recomputes(examples):
    """What autograd keeps for backward, measured by saved-tensor hooks: selective keeps less than none, full
    less than selective."""
    rows, vocab_size = examples["pegasus"]
    batch = collate("pegasus", rows)
    kept = {}
    for mode in ("none", "selective", "full"):
        model = _model("pegasus", vocab_size)
        set_activation_checkpointing(model, mode, every=2)
        stored = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: stored.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            model(**batch).loss.backward()
        kept[mode] = sum(stored)
    assert kept["full"] < kept["selective"] < kept["none"]


def test_the_triton_attention_is_a_custom_op_with_a_fake_and_an_autograd_formula():
    triton = pytest.importorskip("triton")  # noqa: F841
    from suformer.attention.triton import flash

    q, k, v = (torch.randn(2, 2, 20, 16, requires_grad=True) for _ in range(3))
    table = torch.randn(32, 2, requires_grad=True)
    documents = torch.tensor([[1] * 8 + [2] * 12, [1] * 20])
    masks = flash._visibility(torch.ones(2, 20, dtype=torch.bool), None, documents, 20, 20, 0, q.device)
    args = (q, k, v, table, torch.full((2,), 0.5), *masks, torch.tensor([7]), True, 16, None, False, None, 0, 0.1,
            0, 0)
    torch.library.opcheck(flash._attention_op, args)


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
@pytest.mark.parametrize("name", ["pegasus", "mlm"])
def test_the_forward_has_no_graph_break(examples, name, backend):
    if backend == "triton":
        pytest.importorskip("triton")
    rows, vocab_size = examples[name]
    model = _model(name, vocab_size, backend=backend)
    batch = next(batch for label, batch in _batches(examples, name) if label == ("packed" if name == "mlm" else
                                                                                 "padded"))
    explained = torch._dynamo.explain(model)(**(_short(batch) if backend == "triton" else batch))
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["pegasus", "mlm"])
def test_compiled_layers_train_as_eager_ones_do(examples, name):
    """torch.compile on each layer (with selective checkpointing, as a run combines them): the same loss and
    gradients as eager, on two batch shapes (the second compiles with dynamic lengths)."""
    rows, vocab_size = examples[name]
    eager = _model(name, vocab_size)
    compiled = copy.deepcopy(eager)
    layers = 4 if name == "pegasus" else 2  # tiny: two encoder and two decoder blocks; two layers
    assert f"torch.compile on each of {layers} layers" in apply_efficiency(compiled, "selective", 2, compile=True)
    for batch in (collate(name, rows[:3]), collate(name, rows[3:])):
        loss, expected = _grads(eager, batch)
        got_loss, got = _grads(compiled, batch)
        torch.testing.assert_close(got_loss, loss, rtol=1e-5, atol=1e-5)
        for key, grad in expected.items():
            torch.testing.assert_close(got[key], grad, rtol=1e-4, atol=1e-5, msg=key)
        eager.zero_grad(), compiled.zero_grad()


def test_mfu_only_against_a_known_peak_of_the_right_form_factor_and_precision(monkeypatch):
    import re

    def peak_of(name):
        return next(peak for pattern, peak in PEAKS if re.search(pattern, name))

    assert peak_of("NVIDIA H100 80GB HBM3").bf16 == 989.5e12  # SXM
    assert peak_of("NVIDIA H100 PCIe").bf16 == 756.5e12
    assert peak_of("NVIDIA H100 NVL").bf16 == peak_of("NVIDIA H200 NVL").bf16 == 835.5e12
    assert peak_of("NVIDIA H200").fp32 == 67e12 and peak_of("NVIDIA H200").tf32 == 494.5e12
    assert peak_of("NVIDIA A100-SXM4-40GB") == peak_of("NVIDIA A100 80GB PCIe")
    assert peak_of("NVIDIA L4").bf16 == 121e12
    peak, line = device_peak(torch.device("cpu"), "fp32")
    assert peak is None and "not reported" in line
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GeForce RTX 4090")
    peak, line = device_peak(torch.device("cuda", 0), "bf16")
    assert peak is None and "RTX 4090" in line and "PEAKS" in line
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert device_peak(torch.device("cuda", 0), "bf16") == (756.5e12, "MFU against H100 PCIe bf16 dense peak 756 "
                                                                      "TFLOP/s")


def _engine_losses(family, batches, stage=0, precision="fp32", checkpointing="none", compile=False, plain=False):
    """Losses of four steps of AdamW (clipped at 1.0) on a tiny model: through a one-process DeepSpeed engine with
    the given settings, or in plain PyTorch (the reference)."""
    from suformer.train.engine import EngineSettings, deepspeed_engine
    from suformer.train.optimizers import build_optimizer

    torch.manual_seed(0)
    model = build_model(family, "tiny", vocab_size=300, dropout=0.0)
    apply_efficiency(model, checkpointing, 2, compile)
    settings = EngineSettings(micro_batch_size=4, zero_stage=stage, precision=precision, grad_clip=1.0)
    optimizer = build_optimizer(model, "adamw", 1e-3, 0.01, 1e-6, flat_partitions=settings.flattens_parameters)
    engine = None if plain else deepspeed_engine(model, optimizer, None, settings)
    losses = []
    for batch in batches:
        if plain:
            optimizer.zero_grad()
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
        else:
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
        losses.append(loss.item())
    return losses


def _random_batches(family):
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(4):
        ids = torch.randint(3, 300, (4, 24), generator=generator)
        ids[1, 16:] = 0
        batches.append(dict(input_ids=ids, decoder_input_ids=ids[:, :12], labels=ids[:, 1:13])
                       if family == "t5_pegasus" else dict(input_ids=ids, labels=ids))
    return batches


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_the_engine_trains_with_checkpointing_in_every_zero_stage_and_bf16_on_cpu(stage, precision):
    """DeepSpeed on CPU (gloo, a group of one) with selective checkpointing: fp32 follows plain PyTorch to float
    precision; bf16 (the GPU path, DeepSpeed's CPU accelerator runs it in every stage) within bf16's tolerance."""
    batches = _random_batches("t5_pegasus")
    reference = _engine_losses("t5_pegasus", batches, plain=True)
    losses = _engine_losses("t5_pegasus", batches, stage, precision, "selective")
    assert reference[-1] < reference[0] - 0.2  # it learns
    assert losses == pytest.approx(reference, rel=1e-5 if precision == "fp32" else 0, abs=0 if precision == "fp32"
                                   else 0.02)


@pytest.mark.slow
@pytest.mark.parametrize("stage, precision", [(0, "fp32"), (2, "bf16")])
def test_the_engine_trains_compiled_layers_with_checkpointing(stage, precision):
    batches = _random_batches("roformer_v2")
    reference = _engine_losses("roformer_v2", batches, plain=True)
    losses = _engine_losses("roformer_v2", batches, stage, precision, "full", compile=True)
    assert losses == pytest.approx(reference, rel=1e-4 if precision == "fp32" else 0, abs=0 if precision == "fp32"
                                   else 0.02)
