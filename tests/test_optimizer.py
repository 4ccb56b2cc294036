"""The pretraining optimizer's parameter groups against what they are defined to do."""
import torch

from suformer.models import build_model
from suformer.train.loop import optimizer_groups

D_MODEL, VOCAB = 128, 500


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


def _train(model, groups, steps=30):
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999))
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        ids = torch.randint(1, VOCAB, (8, 24), generator=generator)
        target = torch.randint(1, VOCAB, (8, 12), generator=generator)
        loss = model(input_ids=ids, decoder_input_ids=target[:, :-1], labels=target[:, 1:]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _logits(model):
    ids = torch.randint(1, VOCAB, (4, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return model(input_ids=ids, decoder_input_ids=ids[:, :10]).logits


def test_the_bert4keras_head_follows_the_hf_heads_trajectory_under_adamw():
    hf, scaled = _twins()
    assert hf.output_multipliers() == {} and scaled.output_multipliers() == {"lm_head.weight": D_MODEL**-0.5}
    torch.testing.assert_close(_logits(scaled), _logits(hf))  # the same function before training
    before = _logits(hf)
    settings = dict(lr=1e-3, weight_decay=0.1, eps=1e-6)
    _train(hf, optimizer_groups(hf, **settings))
    _train(scaled, optimizer_groups(scaled, **settings))
    assert (_logits(hf) - before).abs().max() > 1  # it did learn
    torch.testing.assert_close(scaled.lm_head.weight * D_MODEL**-0.5, hf.lm_head.weight, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(_logits(scaled), _logits(hf), rtol=1e-9, atol=1e-10)


def test_without_the_compensation_the_bert4keras_head_lags():
    """The counter-test: the same twins under one learning rate for all weights part ways (what the default did)."""
    hf, scaled = _twins()
    initial = hf.lm_head.weight.detach().clone()
    _train(hf, optimizer_groups(hf, lr=1e-3, weight_decay=0.1, eps=1e-6))
    _train(scaled, [{"params": list(scaled.parameters()), "lr": 1e-3, "weight_decay": 0.1, "eps": 1e-6}])
    moved_hf = (hf.lm_head.weight - initial).norm()
    moved_scaled = (scaled.lm_head.weight * D_MODEL**-0.5 - initial).norm()
    assert moved_scaled < moved_hf / 4  # sqrt(128) = 11.3 times less in function space, give or take Adam's path


def test_groups_decay_matrices_only_and_cover_every_parameter_once():
    for model in _twins() + (build_model("roformer_v2", "tiny", vocab_size=VOCAB),):
        groups = optimizer_groups(model, lr=1e-3, weight_decay=0.01, eps=1e-6)
        ids = [id(p) for g in groups for p in g["params"]]
        assert sorted(ids) == sorted(id(p) for p in model.parameters())
        for group in groups:
            assert all((p.ndim >= 2) == (group["weight_decay"] > 0) for p in group["params"])
