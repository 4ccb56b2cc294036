"""The pretraining optimizers against what they are defined to do: the parameter groups' compensation of the
bert4keras head, AdamWScale against nanoT5's update written out in float64, Adafactor against transformers'
implementation, and both under DeepSpeed ZeRO 0-3 with two workers against one process on the whole batch."""
import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from suformer.models import build_model
from suformer.train.optimizers import Adafactor, AdamWScale, optimizer_named, parameter_groups

D_MODEL, VOCAB = 128, 500
# Relative step sizes for the scaled optimizers (their lr multiplies the weight's RMS), absolute for AdamW.
SETTINGS = {"adamw": dict(lr=1e-3, weight_decay=0.1, eps=1e-6), "adamw_scale": dict(lr=1e-2, weight_decay=0.1,
            eps=1e-6), "adafactor": dict(lr=1e-2, weight_decay=0.1, eps=1e-6)}


def _twins():
    """An hf-mode tiny T5 and its bert4keras-head twin computing the same function: the same weights, the head read
    through d_model**-0.5 and stored d_model**0.5 times larger (as the two modes initialise it). Float64: Adam's
    first steps are nearly sign steps, so float32 rounding of near-zero gradients alone makes twins drift apart."""
    torch.manual_seed(0)
    hf = build_model("t5_pegasus", "tiny", vocab_size=VOCAB, compat="hf", dropout=0.0)
    scaled = build_model("t5_pegasus", "tiny", vocab_size=VOCAB, compat="hf", dropout=0.0, scale_decoder_output=True)
    hf.double()
    scaled.double().load_state_dict(hf.state_dict())
    with torch.no_grad():
        scaled.lm_head.weight.mul_(D_MODEL**0.5)
    return hf, scaled


def _batches(steps, seed=1):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = torch.randint(1, VOCAB, (8, 24), generator=generator)
        target = torch.randint(1, VOCAB, (8, 12), generator=generator)
        yield dict(input_ids=ids, decoder_input_ids=target[:, :-1], labels=target[:, 1:])


def _train(model, optimizer, steps=30):
    for batch in _batches(steps):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _logits(model):
    ids = torch.randint(1, VOCAB, (4, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return model(input_ids=ids, decoder_input_ids=ids[:, :10]).logits


@pytest.mark.parametrize("name", ["adamw", "adamw_scale", "adafactor"])
def test_the_bert4keras_head_follows_the_hf_heads_trajectory(name):
    hf, scaled = _twins()
    assert hf.output_multipliers() == {} and scaled.output_multipliers() == {"lm_head.weight": D_MODEL**-0.5}
    torch.testing.assert_close(_logits(scaled), _logits(hf))  # the same function before training
    before = _logits(hf)
    _train(hf, optimizer_named(name, parameter_groups(hf, name, **SETTINGS[name])))
    _train(scaled, optimizer_named(name, parameter_groups(scaled, name, **SETTINGS[name])))
    assert (_logits(hf) - before).abs().max() > 1  # it did learn
    torch.testing.assert_close(scaled.lm_head.weight * D_MODEL**-0.5, hf.lm_head.weight, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(_logits(scaled), _logits(hf), rtol=1e-9, atol=1e-10)


def test_without_the_compensation_the_bert4keras_head_lags():
    """The counter-test: the same twins under one learning rate for all weights part ways (what the default did)."""
    hf, scaled = _twins()
    initial = hf.lm_head.weight.detach().clone()
    _train(hf, optimizer_named("adamw", parameter_groups(hf, "adamw", **SETTINGS["adamw"])))
    one_lr = [{"params": list(scaled.parameters()), "lr": 1e-3, "weight_decay": 0.1, "eps": 1e-6}]
    _train(scaled, optimizer_named("adamw", one_lr))
    moved_hf = (hf.lm_head.weight - initial).norm()
    moved_scaled = (scaled.lm_head.weight * D_MODEL**-0.5 - initial).norm()
    assert moved_scaled < moved_hf / 4  # sqrt(128) = 11.3 times less in function space, give or take Adam's path


@pytest.mark.parametrize("name", ["adamw", "adamw_scale", "adafactor"])
def test_groups_decay_matrices_only_and_cover_every_parameter_once(name):
    for model in _twins() + (build_model("roformer_v2", "tiny", vocab_size=VOCAB),):
        groups = parameter_groups(model, name, lr=1e-3, weight_decay=0.01, eps=1e-6)
        ids = [id(p) for g in groups for p in g["params"]]
        assert sorted(ids) == sorted(id(p) for p in model.parameters())
        for group in groups:
            assert all((p.ndim >= 2) == (group["weight_decay"] > 0) for p in group["params"])
            assert name == "adamw" or len(group["params"]) == 1


def _tiny_t5():
    torch.manual_seed(0)
    return build_model("t5_pegasus", "tiny", vocab_size=VOCAB, dropout=0.0).double()


def test_adamw_scale_is_nanot5s_update():
    """Five steps against nanoT5's AdamWScale written out per tensor in float64: Adam's bias-corrected step times
    max(1e-3, RMS(weight)) taken before the step, then decoupled decay by lr x weight_decay."""
    model, reference = _tiny_t5(), _tiny_t5()
    lr, betas, eps, decay = 1e-2, (0.9, 0.999), 1e-6, 0.1
    optimizer = AdamWScale([{"params": [p]} for p in model.parameters()], lr=lr, eps=eps, weight_decay=decay)
    moments = {name: (torch.zeros_like(p), torch.zeros_like(p)) for name, p in reference.named_parameters()}
    for t, batch in enumerate(_batches(5), start=1):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
        reference.zero_grad()
        reference(**batch).loss.backward()
        with torch.no_grad():
            for name, p in reference.named_parameters():
                m, v = moments[name]
                m.copy_(betas[0] * m + (1 - betas[0]) * p.grad)
                v.copy_(betas[1] * v + (1 - betas[1]) * p.grad**2)
                size = lr * math.sqrt(1 - betas[1]**t) / (1 - betas[0]**t) * max(1e-3, p.pow(2).mean().sqrt().item())
                p.sub_(size * m / (v.sqrt() + eps))
                p.mul_(1 - lr * decay)
    assert any((p - q).abs().max() > 1e-3 for p, q in zip(model.parameters(), _tiny_t5().parameters()))
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("beta1", [None, 0.9])
def test_adafactor_is_transformers_adafactor_unfactored(beta1):
    """Five steps against transformers' Adafactor with relative steps scaled by the weight's RMS (T5's setting),
    handed every tensor flattened so that it runs unfactored, as ours always does."""
    from transformers.optimization import Adafactor as Reference

    model, reference = _tiny_t5(), _tiny_t5()
    names = [name for name, _ in reference.named_parameters()]
    flat = [torch.nn.Parameter(p.detach().reshape(-1).clone()) for p in reference.parameters()]
    shapes = [p.shape for p in reference.parameters()]
    ours = Adafactor([{"params": [p]} for p in model.parameters()], lr=1e-2, beta1=beta1)
    theirs = Reference(flat, lr=1e-2, beta1=beta1, scale_parameter=True, relative_step=False, warmup_init=False,
                       clip_threshold=1.0, decay_rate=-0.8, eps=(1e-30, 1e-3), weight_decay=0.0)
    for batch in _batches(5):
        ours.zero_grad()
        model(**batch).loss.backward()
        ours.step()
        theirs.zero_grad()
        weights = {name: p.view(shape) for name, p, shape in zip(names, flat, shapes)}
        torch.func.functional_call(reference, weights, kwargs=batch).loss.backward()
        theirs.step()
    assert any((p - q.reshape(-1)).abs().max() > 1e-3 for p, q in zip(flat, _tiny_t5().parameters()))
    for name, p, q in zip(names, model.parameters(), flat):
        torch.testing.assert_close(p.reshape(-1), q, rtol=1e-10, atol=1e-12, msg=name)


# -- under DeepSpeed ------------------------------------------------------------------------------------------------
# (optimizer, ZeRO stage, optimizer state offloaded to the CPU: DeepSpeed then calls step() once for all groups)
ZERO_CASES = [(name, stage, False) for name in ("adamw_scale", "adafactor") for stage in (0, 1, 2, 3)] + [
    ("adafactor", 2, True), ("adamw_scale", 3, True)]
SLICE_RMS = ("adafactor", 2, False)  # the counter-case: each rank takes the RMS of its partition, as torch's would
STEPS = 3


def _zero_batch(rank: int, step: int) -> dict:
    generator = torch.Generator().manual_seed(100 * step + rank)
    ids = torch.randint(1, VOCAB, (2, 16), generator=generator)
    return dict(input_ids=ids, decoder_input_ids=ids[:, :8], labels=ids[:, 1:9])


def _zero_worker(rank, world, port, folder):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), DS_ACCELERATOR="cpu")
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    from suformer.config import TrainSection
    from suformer.train.engine import deepspeed_config
    from suformer.train.jit_ops import load_deepspeed_ops, ops_for
    from suformer.train.optimizers import build_optimizer

    torch.set_num_threads(1)
    load_deepspeed_ops(ops_for(use_gpu=False))
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    for case in ZERO_CASES + ["slice"]:
        (name, stage, offload), whole = (SLICE_RMS, False) if case == "slice" else (case, True)
        train = TrainSection(num_workers=world, zero_stage=stage, offload_optimizer=offload, optimizer=name,
                             micro_batch_size=2, grad_clip=0.0, lr=SETTINGS[name]["lr"],
                             weight_decay=SETTINGS[name]["weight_decay"], adam_eps=SETTINGS[name]["eps"])
        torch.manual_seed(0)
        model = build_model("t5_pegasus", "tiny", vocab_size=VOCAB, dropout=0.0)
        settings = train.engine_settings()
        assert settings.flattens_parameters == (stage > 0)
        optimizer = build_optimizer(model, name, train.lr, train.weight_decay, train.adam_eps,
                                    flat_partitions=whole and settings.flattens_parameters, offloaded=offload)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(settings))
        for step in range(STEPS):
            engine.backward(engine(**_zero_batch(rank, step)).loss)
            engine.step()
        # Gathering is collective under ZeRO-3: every rank calls it. Without ZeRO the module holds the fp32 weights.
        weights = {n: (safe_get_full_fp32_param(p) if stage else p.detach()).clone()
                   for n, p in engine.module.named_parameters()}
        if rank == 0:
            torch.save(weights, folder / ("slice.pt" if case == "slice" else f"{name}-{stage}-{offload}.pt"))


def _one_process(name: str) -> dict:
    """The same steps in one process: the mean of the two workers' losses (DeepSpeed averages their gradients)."""
    torch.manual_seed(0)
    model = build_model("t5_pegasus", "tiny", vocab_size=VOCAB, dropout=0.0)
    optimizer = optimizer_named(name, parameter_groups(model, name, **SETTINGS[name]))
    for step in range(STEPS):
        optimizer.zero_grad()
        (sum(model(**_zero_batch(rank, step)).loss for rank in range(2)) / 2).backward()
        optimizer.step()
    return {key: value.detach() for key, value in model.named_parameters()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_the_scaled_optimizers_under_zero_0_to_3_match_one_process(tmp_path):
    mp.spawn(_zero_worker, args=(2, _free_port(), tmp_path), nprocs=2)
    initial = dict(build_model("t5_pegasus", "tiny", vocab_size=VOCAB, dropout=0.0).named_parameters())
    expected = {name: _one_process(name) for name in ("adamw_scale", "adafactor")}
    for name, stage, offload in ZERO_CASES:
        got = torch.load(tmp_path / f"{name}-{stage}-{offload}.pt")
        assert (expected[name]["lm_head.weight"] - initial["lm_head.weight"]).abs().max() > 1e-3
        for key, value in expected[name].items():
            torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-6,
                                       msg=f"{name}, ZeRO-{stage}{', offloaded' if offload else ''}: {key}")
    # The counter-case: statistics of each rank's slice instead of the whole tensor give other weights.
    sliced = torch.load(tmp_path / "slice.pt")
    assert max((sliced[k] - v).abs().max() for k, v in expected[SLICE_RMS[0]].items()) > 1e-3
