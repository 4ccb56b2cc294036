"""Each fine-tuning trick against its definition, computed independently (autograd on a copy, float64 finite
differences, closed forms, slow per-row loops)."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from suformer.models import build_model
from suformer.finetune.tasks.classification import SequenceClassifier
from suformer.finetune.tricks.adversarial import fgm_backward, gradient_penalty, pgd_backward
from suformer.finetune.tricks.child_tuning import ChildTuningD, ChildTuningF
from suformer.finetune.tricks.ema import ema_model
from suformer.finetune.tricks.exposure_bias import replace_decoder_inputs
from suformer.finetune.tricks.layerwise_lr import layerwise_lr_groups
from suformer.finetune.tricks.lora import apply_lora, trainable_parameters
from suformer.finetune.tricks.rdrop import rdrop_loss, repeat_for_rdrop
from suformer.finetune.tricks.simcse import simcse_loss
from suformer.finetune.tricks.sparse_softmax import sparse_softmax_cross_entropy


def classifier(dtype=torch.float32, pooling="cls", attention_backend="sdpa"):
    torch.manual_seed(0)
    encoder = build_model("roformer_v2", "tiny", vocab_size=120, dropout=0.0, attention_backend=attention_backend)
    return SequenceClassifier(encoder, num_labels=2, pooling=pooling, dropout=0.0).to(dtype)


def batch(rows=4, length=12):
    g = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(5, 120, (rows, length), generator=g), "labels": torch.tensor([0, 1] * (rows // 2))}


def grads_at(model, embedding_value, inputs):
    """dL/dtheta of a copy of `model` whose embedding matrix is set to `embedding_value`."""
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.word_embeddings.copy_(embedding_value)
    twin.zero_grad()
    twin(**inputs).loss.backward()
    return {n: p.grad.clone() for n, p in twin.named_parameters()}


def test_fgm_adds_the_adversarial_gradient_and_restores_the_embedding_exactly():
    model, inputs = classifier(), batch()
    original = model.word_embeddings.detach().clone()
    clean = grads_at(model, original, inputs)
    g = clean["encoder.embeddings.word_embeddings.weight"]
    perturbed = original + 0.05 * g / g.norm()
    adversarial = grads_at(model, perturbed, inputs)

    loss, adv_loss = fgm_backward(lambda: model(**inputs).loss, model.word_embeddings, epsilon=0.05)
    assert torch.equal(model.word_embeddings, original)
    assert adv_loss > loss  # a step up the gradient raises the loss
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, clean[name] + adversarial[name], rtol=1e-4, atol=1e-6)


def test_pgd_stays_in_its_epsilon_ball_and_keeps_clean_plus_last_adversarial_gradient():
    model, inputs = classifier(), batch()
    original = model.word_embeddings.detach().clone()
    seen = []

    def loss_fn():
        seen.append(model.word_embeddings.detach().clone())
        return model(**inputs).loss

    epsilon = 0.5  # three steps of 0.3 leave the ball: the projection must act
    pgd_backward(loss_fn, model.word_embeddings, list(model.parameters()), epsilon=epsilon, alpha=0.3, steps=3)
    assert len(seen) == 4 and torch.equal(seen[0], original)
    radii = [(e - original).norm().item() for e in seen[1:]]
    assert radii[0] == pytest.approx(0.3, rel=1e-4) and all(r <= epsilon * (1 + 1e-5) for r in radii)
    assert radii[-1] == pytest.approx(epsilon, rel=1e-4)
    assert torch.equal(model.word_embeddings, original)
    clean, last = grads_at(model, original, inputs), grads_at(model, seen[-1], inputs)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, clean[name] + last[name], rtol=1e-4, atol=1e-6)


def test_gradient_penalty_value_and_its_second_order_gradient():
    # Fused attention (SDPA's flash path, the Triton kernels) has no double backward: the reference backend does.
    model, inputs = classifier(torch.float64, attention_backend="reference"), batch()
    E = model.word_embeddings

    def penalised():
        return gradient_penalty(model(**inputs).loss, E, epsilon=1.0)

    loss = model(**inputs).loss
    (g,) = torch.autograd.grad(loss, E)
    assert penalised().item() == pytest.approx(loss.item() + 0.5 * g.pow(2).sum().item(), rel=1e-12)

    weight = model.classifier.weight
    (analytic,) = torch.autograd.grad(penalised(), weight)
    direction, h = torch.randn_like(weight), 1e-6
    with torch.no_grad():
        weight += h * direction
    up = penalised().item()
    with torch.no_grad():
        weight -= 2 * h * direction
    down = penalised().item()
    assert (analytic * direction).sum().item() == pytest.approx((up - down) / (2 * h), rel=1e-5)
    (plain,) = torch.autograd.grad(model(**inputs).loss, weight)
    assert not torch.allclose(plain, analytic)  # the penalty contributes a gradient of its own


def test_rdrop_loss_is_ce_plus_symmetric_kl_and_zero_kl_for_identical_outputs():
    torch.manual_seed(0)
    logits, labels = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 5, (4,)).repeat_interleave(2)
    slow_kl = sum(F.kl_div(logits[i + 1].log_softmax(-1), logits[i].log_softmax(-1), log_target=True, reduction="sum")
                  + F.kl_div(logits[i].log_softmax(-1), logits[i + 1].log_softmax(-1), log_target=True, reduction="sum")
                  for i in range(0, 8, 2)) / 4
    expected = F.cross_entropy(logits, labels) + 4.0 / 4 * slow_kl
    assert rdrop_loss(logits, labels, alpha=4.0).item() == pytest.approx(expected.item(), rel=1e-10)
    swapped = logits.view(4, 2, 5).flip(1).reshape(8, 5)
    assert rdrop_loss(swapped, labels).item() == pytest.approx(rdrop_loss(logits, labels).item(), rel=1e-12)
    same = logits[0::2].repeat_interleave(2, dim=0)
    assert rdrop_loss(same, labels).item() == pytest.approx(F.cross_entropy(same, labels).item(), rel=1e-12)
    assert torch.equal(repeat_for_rdrop({"x": torch.arange(3)})["x"], torch.tensor([0, 0, 1, 1, 2, 2]))


def test_rdrop_per_token_kl_ignores_padding_positions():
    torch.manual_seed(0)
    logits, labels = torch.randn(4, 3, 6, dtype=torch.float64), torch.randint(0, 6, (4, 3))
    labels[:, 2] = -100
    changed = logits.clone()
    changed[1, 2] += 5.0  # only at an ignored position
    assert rdrop_loss(changed, labels).item() == pytest.approx(rdrop_loss(logits, labels).item(), rel=1e-12)


def test_child_tuning_f_keeps_about_p_of_the_entries_scaled_by_one_over_p():
    p, n = 0.3, 200_000
    param = torch.nn.Parameter(torch.zeros(n))
    param.grad = torch.ones(n)
    ChildTuningF([param], reserve_p=p, generator=torch.Generator().manual_seed(0)).mask_gradients()
    kept = param.grad != 0
    assert abs(kept.float().mean().item() - p) < 4 * math.sqrt(p * (1 - p) / n)
    assert torch.allclose(param.grad[kept], torch.full((int(kept.sum()),), 1 / p))


def test_child_tuning_d_masks_all_but_the_highest_fisher_entries():
    model, inputs = classifier(), batch()
    batches = [{k: v[i:i + 2] for k, v in inputs.items()} for i in (0, 2)]
    child = ChildTuningD.from_fisher(model, lambda: (model(**b).loss for b in batches), reserve_p=0.2)
    assert set(child.masks) == {n for n, _ in model.named_parameters() if ".layers." in n}

    fisher = {}  # slow reference: per batch, clip each parameter's gradient to norm 1, square, average
    for b in batches:
        grads = torch.autograd.grad(model(**b).loss, [child.named_params[n] for n in child.masks])
        for name, g in zip(child.masks, grads):
            g = g * min(1.0, 1.0 / (g.norm().item() + 1e-6))
            fisher[name] = fisher.get(name, 0) + g.pow(2) / len(batches)
    values = torch.cat([f.flatten() for f in fisher.values()]).sort(descending=True).values
    kept = sum(int(m.sum()) for m in child.masks.values())
    assert kept == pytest.approx(0.2 * values.numel(), rel=0.01)
    cut = values[kept - 1]
    for name, mask in child.masks.items():
        assert torch.equal(mask[fisher[name] > cut * 1.001], torch.ones_like(mask[fisher[name] > cut * 1.001]))
        assert not mask[fisher[name] < cut * 0.999].any()

    model(**inputs).loss.backward()
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    child.mask_gradients()
    for name, p in model.named_parameters():
        expected = before[name] * child.masks[name] if name in child.masks else before[name]
        assert torch.equal(p.grad, expected)


def test_ema_matches_the_closed_form():
    decay, model = 0.9, torch.nn.Linear(3, 2)
    history = [model.weight.detach().clone()]
    ema = ema_model(model, decay)
    for step in range(5):
        with torch.no_grad():
            model.weight.add_(torch.randn_like(model.weight))
        history.append(model.weight.detach().clone())
        ema.update_parameters(model)
    k = len(history) - 1
    closed = decay**k * history[0] + sum((1 - decay) * decay ** (k - i) * history[i] for i in range(1, k + 1))
    torch.testing.assert_close(ema.module.weight, closed, rtol=1e-6, atol=1e-6)


def test_layerwise_lr_decays_from_the_top_block_down_to_the_embeddings():
    model = classifier()
    groups = layerwise_lr_groups(model, lr=1e-3, decay=0.5)
    names = [n for g in groups for n in g["names"]]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())  # each parameter exactly once
    lr_of = {n: g["lr"] for g in groups for n in g["names"]}
    layers = model.encoder.config.num_layers
    for name in names:
        if ".layers." in name:
            i = int(name.split(".layers.")[1].split(".")[0])
            assert lr_of[name] == pytest.approx(1e-3 * 0.5 ** (layers - 1 - i))
        elif "embeddings" in name:
            assert lr_of[name] == pytest.approx(1e-3 * 0.5**layers)
        else:
            assert lr_of[name] == pytest.approx(1e-3), name


def test_lora_trains_only_its_adapters_and_merges_back_to_identical_outputs():
    base, inputs = classifier(), batch()
    with torch.no_grad():
        reference = base(**inputs).logits
    frozen = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = apply_lora(base, "roformer_v2", r=4, alpha=8, trainable_modules=["classifier"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "classifier" in n for n in trainable)
    assert trainable_parameters(model) < 0.1 * sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, reference)  # B = 0: starts as the base model

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        model(**inputs).loss.backward()
        optimizer.step()
    with torch.no_grad():
        adapted = model(**inputs).logits
    assert not torch.allclose(adapted, reference)
    merged = model.merge_and_unload()
    for name, p in merged.named_parameters():  # frozen weights untouched by training, changed only by merging
        if not any(t in name for t in ("query", "key", "value", "classifier")):
            assert torch.equal(p, frozen[name]), name
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, adapted, rtol=1e-5, atol=1e-5)


def test_sparse_softmax_is_the_cross_entropy_over_the_top_k():
    torch.manual_seed(0)
    logits, labels = torch.randn(6, 20, dtype=torch.float64, requires_grad=True), torch.randint(0, 20, (6,))
    slow = sum(math.log(sum(math.exp(v) for v in sorted(row.tolist(), reverse=True)[:5])) - row[y].item()
               for row, y in zip(logits, labels)) / 6
    loss = sparse_softmax_cross_entropy(logits, labels, k=5)
    assert loss.item() == pytest.approx(slow, rel=1e-10)
    loss.backward()
    outside = logits.detach() < logits.detach().topk(5, -1).values[:, -1:]
    target = F.one_hot(labels, 20).bool()
    assert (logits.grad[outside & ~target] == 0).all()  # truncated logits get no gradient
    full = sparse_softmax_cross_entropy(logits, labels, k=20)
    assert full.item() == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-12)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_classifier_pooling_ignores_padding(pooling):
    model, inputs = classifier(pooling=pooling).eval(), batch()
    padded = {"input_ids": F.pad(inputs["input_ids"], (0, 5), value=0)}
    with torch.no_grad():
        torch.testing.assert_close(model(**padded).logits, model(input_ids=inputs["input_ids"]).logits,
                                   rtol=1e-5, atol=1e-5)
        hidden = model.encoder.encode(inputs["input_ids"])
    expected = hidden[:, 0] if pooling == "cls" else hidden.mean(1)
    torch.testing.assert_close(model.pool(hidden, torch.ones(hidden.shape[:2], dtype=torch.bool)), expected)


def test_exposure_bias_replacement_draws_from_the_row_and_leaves_start_padding_and_targets_alone():
    g = torch.Generator().manual_seed(0)
    rows, length = 4000, 20
    labels = torch.arange(rows * length).view(rows, length) + 200  # distinct tokens: a draw's row is visible
    lengths = torch.randint(5, length + 1, (rows,), generator=g)
    labels[torch.arange(length)[None, :] >= lengths[:, None]] = -100
    shifted = torch.full_like(labels, 0)
    shifted[:, 0] = 101
    shifted[:, 1:] = labels[:, :-1].clamp(min=0)
    kept = labels.clone()
    out = replace_decoder_inputs(shifted, labels, sample_prob=0.5, token_prob=0.3, generator=g)
    assert torch.equal(labels, kept)  # the targets are never touched
    assert torch.equal(out[:, 0], shifted[:, 0])  # nor the start token
    padding = labels == -100
    assert torch.equal(out[padding], shifted[padding])
    changed_rows = 0
    for row in range(rows):
        own = set(labels[row][labels[row] != -100].tolist())
        assert set(out[row, 1:][~padding[row, 1:]].tolist()) <= own  # replacements come from the same target
        changed_rows += bool((out[row] != shifted[row]).any())
    assert 0.35 < changed_rows / rows < 0.5  # half the rows are drawn; a short one may keep every token
    changed = (out != shifted) & ~padding
    eligible = (~padding).sum().item() - rows  # every real position but the start
    # 0.5 x 0.3 of them are redrawn; a redraw hits the same token with chance 1/len (about 1/12 here)
    assert 0.125 < changed.sum().item() / eligible < 0.145
    assert torch.equal(replace_decoder_inputs(shifted, labels, sample_prob=0.0, generator=g), shifted)


def test_simcse_loss_picks_each_views_twin_out_of_the_batch():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 5, generator=g, dtype=torch.float64)
    unit = z / z.norm(dim=1, keepdim=True)
    expected = 0.0
    for i in range(6):  # softmax over the other 5 rows, the twin i^1 the target
        logits = {j: 20 * float(unit[i] @ unit[j]) for j in range(6) if j != i}
        expected -= logits[i ^ 1] - math.log(sum(math.exp(v) for v in logits.values()))
    assert simcse_loss(z).item() == pytest.approx(expected / 6, rel=1e-10)
    twins = torch.randn(3, 5, generator=g, dtype=torch.float64).repeat_interleave(2, 0)
    assert simcse_loss(twins).item() < simcse_loss(z).item()  # identical views are easy to pair


@pytest.mark.parametrize("mode", ["prompt", "full"])
def test_ptuning_reads_the_mlm_head_at_mask_and_prompt_mode_trains_only_the_eight_prompt_rows(mode):
    from suformer.finetune.tricks.ptuning import PTuningClassifier

    torch.manual_seed(0)
    mlm = build_model("roformer_v2", "tiny", vocab_size=120, dropout=0.0)
    label_words, mask_id, cls_id = [110, 111], 103, 101
    model = PTuningClassifier(mlm, label_words, mask_id, cls_id, freeze_model=mode == "prompt")
    inputs = {"input_ids": torch.tensor([[101, 20, 21, 22, 102], [101, 30, 31, 102, 0]]), "labels": torch.tensor([0, 1])}
    templated = torch.tensor([[101, 1, 2, 3, 4, 103, 5, 6, 7, 8, 20, 21, 22, 102],
                              [101, 1, 2, 3, 4, 103, 5, 6, 7, 8, 30, 31, 102, 0]])
    assert torch.equal(model.templated(inputs["input_ids"]), templated)
    expected = mlm(templated).logits[:, 5][:, label_words]  # the plain MLM forward at [MASK]
    torch.testing.assert_close(model(**inputs).logits, expected)

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.0)
    model(**inputs).loss.backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    embedding = "mlm.embeddings.word_embeddings.weight"
    rows = (model.word_embeddings != before[embedding]).any(dim=1).nonzero().flatten().tolist()
    if mode == "prompt":
        assert len(trainable) == 1 and changed == {embedding}
        assert rows == list(range(1, 9))  # [unused1..8]; the text's and label words' rows stay put
    else:
        assert len(changed) > 10 and set(range(1, 9)) <= set(rows)


def test_ladder_side_tuning_reads_the_frozen_expert_and_trains_only_the_side_network():
    from suformer.finetune.tricks.ladder_side import LadderSideClassifier

    torch.manual_seed(0)
    expert = build_model("roformer_v2", "tiny", vocab_size=120, dropout=0.0)  # 2 layers
    model = LadderSideClassifier(expert, num_labels=2, side_layers=2, side_hidden=32, side_heads=2, side_ffn=64,
                                 dropout=0.0)
    inputs = batch()
    mask = inputs["input_ids"] != 0
    states = model.expert_states(inputs["input_ids"], mask)
    torch.testing.assert_close(states[-1], expert.eval().encode(inputs["input_ids"], mask))  # the expert's own path

    model(**inputs).loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in expert.parameters())  # nothing reaches the expert
    side = [n for n, p in model.named_parameters() if p.requires_grad]
    assert side and all(not n.startswith("expert.") for n in side)
    assert all(p.grad is not None for n, p in model.named_parameters() if n in side)

    # The ladders are the side network's only view of the expert's layers: with them zeroed, changing an expert
    # layer changes nothing; with them in place it does.
    def logits_after_changing_expert_layer():
        before = model(**inputs).logits.detach()
        with torch.no_grad():
            expert.layers[0].ffn_out.weight.mul_(3.0)
        after = model(**inputs).logits.detach()
        with torch.no_grad():
            expert.layers[0].ffn_out.weight.div_(3.0)
        return before, after

    before, after = logits_after_changing_expert_layer()
    assert not torch.allclose(before, after)
    with torch.no_grad():
        for ladder in model.ladders:
            ladder.weight.zero_()
    before, after = logits_after_changing_expert_layer()
    torch.testing.assert_close(before, after)


def test_peft_prompt_tuning_prepends_its_vectors_and_trains_only_them_and_the_head():
    from suformer.finetune.tricks.prompt_tuning import apply_prompt_tuning

    torch.manual_seed(0)
    base = classifier()
    model = apply_prompt_tuning(base, num_virtual_tokens=4)
    inputs = batch()
    mask = inputs["input_ids"] != 0
    prompt = model.prompt_encoder["default"].embedding.weight  # PEFT's soft prompt, [4, hidden]
    # The same computation by hand: prompt vectors, then the word vectors; [CLS] is the first real token.
    words = base.encoder.embeddings.word_embeddings(inputs["input_ids"])
    embeds = torch.cat([prompt.expand(len(words), -1, -1), words], dim=1)
    full_mask = torch.cat([torch.ones(len(words), 4, dtype=torch.bool), mask], dim=1)
    hidden = base.encoder.encode(None, full_mask, inputs_embeds=embeds)
    torch.testing.assert_close(model(**inputs, attention_mask=mask).logits, base.classifier(hidden[:, 4]))

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("prompt_encoder" in n or "classifier" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(**inputs, attention_mask=mask).loss.backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert any("prompt_encoder" in n for n in changed) and changed <= trainable
