"""Autoregressive decoding with a KV cache: greedy, top-k/top-p sampling and beam search.

Beam search follows bert4keras' AutoRegressiveDecoder (the recipe behind T5 PEGASUS' published scores): beams are
ranked by summed log-probabilities; as soon as the best beam ends with the end token it is returned, other
finished beams are dropped and the beam shrinks. With `length_penalty` set, finished beams are kept instead and
the one with the best `score / length**length_penalty` is returned once no beam is left (or at max_new_tokens).

The search loops are written once against a *stepper*: `stepper(tokens)` feeds the new tokens [N, 1] (or None
for the prompt) and returns next-token logits [N, V]; `stepper.reorder(rows)` keeps only the given rows' cache.
Each family defines its stepper next to its model (t5.py: encoder once, then the decoder; roformer.py: UniLM) and
its `generate` calls `search`.
"""
from __future__ import annotations

from typing import Optional

import torch


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """-inf outside the `top_k` best tokens and outside the smallest set whose probability reaches `top_p`."""
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token once the tokens *before* it already reach top_p (the crossing token is kept).
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _constrain(logits: torch.Tensor, prefixes: torch.Tensor, allowed_fn, beams: int, eos: int) -> torch.Tensor:
    """-inf outside `allowed_fn(batch_index, prefix)` for each row (an empty set allows only the end token), so
    the softmax renormalises over the allowed tokens."""
    allowed = torch.full_like(logits, float("-inf"))
    for row, prefix in enumerate(prefixes.tolist()):
        allowed[row, allowed_fn(row // beams, prefix) or [eos]] = 0.0
    return logits + allowed


def _sample_or_greedy(stepper, batch, *, max_new_tokens, eos, pad, min_new_tokens, do_sample, temperature, top_k,
                      top_p, generator, device, prefix_allowed_tokens_fn):
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    out, tokens = [], None
    for step in range(max_new_tokens):
        logits = stepper(tokens)
        if prefix_allowed_tokens_fn is not None:
            prefixes = torch.stack(out, dim=1) if out else torch.empty(batch, 0, dtype=torch.long, device=device)
            logits = _constrain(logits, prefixes, prefix_allowed_tokens_fn, 1, eos)
        if step < min_new_tokens:
            logits[:, eos] = float("-inf")
        if do_sample:
            probs = filter_logits(logits / temperature, top_k, top_p).softmax(dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        else:
            nxt = logits.argmax(dim=-1)
        nxt = nxt.masked_fill(finished, pad)
        out.append(nxt)
        finished |= nxt == eos
        if finished.all():
            break
        tokens = nxt[:, None]
    return torch.stack(out, dim=1) if out else torch.empty(batch, 0, dtype=torch.long, device=device)


def _beam_search(stepper, batch, num_beams, *, max_new_tokens, eos, pad, min_new_tokens, length_penalty, device,
                 prefix_allowed_tokens_fn):
    K = num_beams
    scores = torch.full((batch, K), float("-inf"), device=device)
    scores[:, 0] = 0.0  # every row starts from the same prompt: expand from beam 0 only
    active = torch.full((batch,), K, device=device)  # bert4keras shrinks the beam as beams finish
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    seqs = torch.empty(batch, K, 0, dtype=torch.long, device=device)
    results: list[Optional[tuple[float, torch.Tensor]]] = [None] * batch
    tokens = None
    for step in range(max_new_tokens):
        logits = stepper(tokens)
        if prefix_allowed_tokens_fn is not None:
            logits = _constrain(logits, seqs.flatten(0, 1), prefix_allowed_tokens_fn, K, eos)
        logprobs = logits.log_softmax(dim=-1)
        if step < min_new_tokens:
            logprobs[:, eos] = float("-inf")
        vocab = logprobs.shape[-1]
        candidates = (scores[:, :, None] + logprobs.view(batch, K, vocab)).view(batch, K * vocab)
        top_scores, top_index = candidates.topk(K, dim=-1)  # sorted, best first
        rank = torch.arange(K, device=device)[None, :]
        top_scores = top_scores.masked_fill(rank >= active[:, None], float("-inf"))
        origin, token = top_index // vocab, top_index % vocab
        seqs = torch.cat([seqs.gather(1, origin[:, :, None].expand(-1, -1, seqs.shape[2])), token[:, :, None]], 2)
        scores = top_scores
        ended = (token == eos) & torch.isfinite(scores)
        for b in range(batch):
            if done[b]:
                continue
            if length_penalty is None:
                if ended[b, 0]:  # the best beam ended: return it
                    results[b], done[b] = (scores[b, 0].item(), seqs[b, 0]), True
            else:
                for j in ended[b].nonzero().flatten().tolist():
                    normalised = scores[b, j].item() / (step + 1) ** length_penalty
                    if results[b] is None or normalised > results[b][0]:
                        results[b] = (normalised, seqs[b, j])
        finishing = ended & ~done[:, None]
        active = active - finishing.sum(dim=1)
        scores = scores.masked_fill(finishing, float("-inf"))
        done |= active <= 0
        if done.all():
            break
        rows = (torch.arange(batch, device=device)[:, None] * K + origin).flatten()
        stepper.reorder(rows)
        tokens = token.flatten()[:, None]
    for b in range(batch):
        if results[b] is None or (length_penalty is not None and torch.isfinite(scores[b, 0])):
            # No beam finished (or, with a length penalty, unfinished beams compete too): best live beam.
            length = seqs.shape[2]
            live = scores[b, 0].item() / (length**length_penalty if length_penalty is not None else 1.0)
            if results[b] is None or live > results[b][0]:
                results[b] = (live, seqs[b, 0])
    width = max(len(r[1]) for r in results)
    out = torch.full((batch, width), pad, dtype=torch.long, device=device)
    for b, (_, seq) in enumerate(results):
        out[b, : len(seq)] = seq
    return out


@torch.no_grad()
def _generate(stepper_factory, batch, device, *, eos, pad, max_new_tokens=32, num_beams=1, do_sample=False,
              temperature=1.0, top_k=0, top_p=1.0, length_penalty=None, min_new_tokens=0, generator=None,
              prefix_allowed_tokens_fn=None):
    if num_beams < 1 or max_new_tokens < 1:
        raise ValueError("num_beams and max_new_tokens must be >= 1")
    if num_beams > 1 and do_sample:
        raise ValueError("beam search and sampling are exclusive: set num_beams=1 to sample")
    if num_beams > 1:
        return _beam_search(
            stepper_factory(num_beams), batch, num_beams, max_new_tokens=max_new_tokens, eos=eos, pad=pad,
            min_new_tokens=min_new_tokens, length_penalty=length_penalty, device=device,
            prefix_allowed_tokens_fn=prefix_allowed_tokens_fn,
        )
    return _sample_or_greedy(
        stepper_factory(1), batch, max_new_tokens=max_new_tokens, eos=eos, pad=pad, min_new_tokens=min_new_tokens,
        do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator, device=device,
        prefix_allowed_tokens_fn=prefix_allowed_tokens_fn,
    )


def search(model, stepper_factory, input_ids, *, eos: int, **options) -> torch.Tensor:
    """Generated ids [B, T] for the batch `input_ids`, ending with `eos`, right-padded with the model's [PAD]; the
    model is in eval mode meanwhile. `stepper_factory(copies)` builds the family's stepper with each row repeated
    `copies` times (the beams).

    Options: max_new_tokens (32), num_beams (1), do_sample, temperature, top_k, top_p, length_penalty (None:
    bert4keras semantics), min_new_tokens, generator (a torch.Generator for reproducible sampling),
    prefix_allowed_tokens_fn (as in transformers: `(batch_index, generated_ids) -> allowed next ids`, e.g. a
    prefix tree's children for constrained decoding).
    """
    was_training = model.training
    model.eval()
    try:
        return _generate(stepper_factory, input_ids.shape[0], input_ids.device, eos=eos,
                         pad=model.config.pad_token_id, **options)
    finally:
        model.train(was_training)
