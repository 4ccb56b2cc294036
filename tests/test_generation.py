"""Cached decoding against slow uncached references (bert4keras' algorithms written out) and transformers."""
import pytest
import torch

from suformer.generation import filter_logits
from suformer.models import build_model

VOCAB = 320


def mid_sequence_end_token(greedy: torch.Tensor) -> int:
    """An end token that random weights do predict, first appearing mid-sequence in every row, so that the
    searches really finish beams (not at step 1, not never)."""
    width = greedy.shape[1]
    for token in greedy[:, 2:].flatten().bincount().argsort(descending=True).tolist():
        firsts = [row.tolist().index(token) if token in row.tolist() else width for row in greedy]
        if all(2 <= f < width - 3 for f in firsts):
            return token
    raise AssertionError("no token ends every row mid-sequence; pick another seed")


def t5_with_frequent_eos():
    """A random tiny T5 whose end token is one it actually predicts, so beams do finish."""
    for seed in range(20):
        torch.manual_seed(seed)
        model = build_model("t5_pegasus", "tiny", vocab_size=VOCAB, dropout=0.0).eval()
        x = torch.randint(106, VOCAB, (3, 12))
        model.config.eos_token_id = -1
        try:
            model.config.eos_token_id = mid_sequence_end_token(model.generate(x, max_new_tokens=16))
            return model, x
        except AssertionError:
            continue
    raise AssertionError("no seed gives mid-sequence endings")


def t5_predict(model, src):
    """log-probs of the next token given the output so far, recomputed from scratch (no cache)."""
    def predict(output):
        dec = torch.tensor([[model.config.decoder_start_token_id] + output])
        with torch.no_grad():
            return model(src[None], decoder_input_ids=dec).logits[0, -1].log_softmax(-1)
    return predict


def unilm_predict(model, src):
    """bert4keras AutoTitle: re-encode source + output with segments 0/1, read the last position."""
    def predict(output):
        ids = torch.tensor([src.tolist() + output])
        seg = torch.tensor([[0] * len(src) + [1] * len(output)])
        with torch.no_grad():
            return model(ids, token_type_ids=seg, unilm=True).logits[0, -1].log_softmax(-1)
    return predict


def greedy_reference(predict, max_new, eos):
    output = []
    for _ in range(max_new):
        output.append(int(predict(output).argmax()))
        if output[-1] == eos:
            break
    return output


def bert4keras_beam_search(predict, topk, max_new, eos):
    """snippets.AutoRegressiveDecoder.beam_search, one example at a time."""
    beams, scores = [[]], torch.zeros(1, dtype=torch.float64)
    for _ in range(max_new):
        candidates = torch.stack([predict(b).double() for b in beams]) + scores[:, None]
        vocab = candidates.shape[1]
        top = candidates.flatten().topk(topk).indices
        beams = [beams[int(i) // vocab] + [int(i) % vocab] for i in top]
        scores = candidates.flatten()[top]
        best = int(scores.argmax())
        if beams[best][-1] == eos:
            return beams[best]
        keep = [i for i, b in enumerate(beams) if b[-1] != eos]
        beams, scores, topk = [beams[i] for i in keep], scores[keep], len(keep)
    return beams[int(scores.argmax())]


def strip(row, eos, pad=0):
    row = row.tolist()
    return row[: row.index(eos) + 1] if eos in row else [t for t in row if t != pad]


def test_t5_greedy_with_cache_equals_recomputation():
    model, x = t5_with_frequent_eos()
    eos = model.config.eos_token_id
    out = model.generate(x, max_new_tokens=20)
    for b in range(3):
        assert strip(out[b], eos) == greedy_reference(t5_predict(model, x[b]), 20, eos)


def test_t5_greedy_matches_transformers_generate(tmp_path):
    from transformers import MT5ForConditionalGeneration

    model = build_model("t5_pegasus", "tiny", vocab_size=VOCAB, dropout=0.0, compat="hf").eval()
    model.save_pretrained(tmp_path)
    hf = MT5ForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="eager").eval()
    x = torch.randint(106, VOCAB, (3, 12))
    ours = model.generate(x, max_new_tokens=12)
    theirs = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=12, do_sample=False, num_beams=1,
                         decoder_start_token_id=101, eos_token_id=102, pad_token_id=0)
    assert torch.equal(ours, theirs[:, 1 : 1 + ours.shape[1]])


@pytest.mark.parametrize("num_beams", [2, 4])
def test_t5_beam_search_equals_bert4keras_algorithm(num_beams):
    model, x = t5_with_frequent_eos()
    eos = model.config.eos_token_id
    out = model.generate(x, max_new_tokens=16, num_beams=num_beams)
    for b in range(3):
        assert strip(out[b], eos) == bert4keras_beam_search(t5_predict(model, x[b]), num_beams, 16, eos)


def test_beam_with_length_penalty_returns_best_normalised_finished_beam():
    model, x = t5_with_frequent_eos()
    eos = model.config.eos_token_id
    out = model.generate(x[:1], max_new_tokens=10, num_beams=3, length_penalty=1.0)
    seq = strip(out[0], eos)
    predict = t5_predict(model, x[0])
    # Score every prefix the output claims: its normalised score must be at least that of the greedy output.
    def normalised(s):
        return sum(float(predict(s[:i])[t]) for i, t in enumerate(s)) / len(s)
    assert normalised(seq) >= normalised(greedy_reference(predict, 10, eos)) - 1e-5


def test_sampling_top_k_1_is_greedy_and_generator_makes_it_reproducible():
    model, x = t5_with_frequent_eos()
    greedy = model.generate(x, max_new_tokens=10)
    assert torch.equal(model.generate(x, max_new_tokens=10, do_sample=True, top_k=1), greedy)
    a = model.generate(x, max_new_tokens=10, do_sample=True, top_p=0.9, generator=torch.Generator().manual_seed(3))
    b = model.generate(x, max_new_tokens=10, do_sample=True, top_p=0.9, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_filter_logits_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    kept = torch.isfinite(filter_logits(logits, top_p=0.8))[0].tolist()
    assert kept == [True, True, True, False, False]  # 0.5 + 0.2 < 0.8 <= 0.5 + 0.2 + 0.15
    kept = torch.isfinite(filter_logits(logits, top_k=2, top_p=1.0))[0].tolist()
    assert kept == [True, True, False, False, False]
    shuffled = logits[:, [3, 0, 4, 2, 1]]
    assert torch.isfinite(filter_logits(shuffled, top_p=0.8))[0].tolist() == [False, True, False, True, True]


def unilm_model():
    for seed in range(20):
        torch.manual_seed(seed)
        model = build_model("roformer_v2", "tiny", vocab_size=VOCAB, dropout=0.0).eval()
        with torch.no_grad():  # random post-norm layers barely move the tied embedding: the model would copy
            for p in model.layers.parameters():  # its last input token forever
                p.mul_(6)
        src = torch.randint(106, VOCAB, (2, 9))
        src[:, 0], src[:, -1] = 101, 102
        try:
            return model, src, mid_sequence_end_token(model.generate(src, max_new_tokens=12, eos_token_id=-1))
        except AssertionError:
            continue
    raise AssertionError("no seed gives mid-sequence endings")


def test_unilm_greedy_with_cache_equals_reencoding():
    model, src, eos = unilm_model()
    out = model.generate(src, max_new_tokens=12, eos_token_id=eos)
    for b in range(2):
        assert strip(out[b], eos) == greedy_reference(unilm_predict(model, src[b]), 12, eos)


def test_unilm_beam_search_equals_bert4keras_algorithm():
    model, src, eos = unilm_model()
    out = model.generate(src, max_new_tokens=12, num_beams=3, eos_token_id=eos)
    for b in range(2):
        assert strip(out[b], eos) == bert4keras_beam_search(unilm_predict(model, src[b]), 3, 12, eos)


def test_unilm_rejects_right_padded_batches():
    model, src, _ = unilm_model()
    padded = src.clone()
    padded[1, -2:] = 0
    with pytest.raises(ValueError, match="left-pad"):
        model.generate(padded)
