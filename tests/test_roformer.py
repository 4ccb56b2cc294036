"""RoFormerV2 against a from-the-spec float64 forward, its initialisation, UniLM masks and the JunnYu layout."""
import json
import math

import pytest
import torch

from suformer.models import CheckpointError, build_model, from_pretrained
from suformer.models.checkpoints import checkpoint_state
from suformer.models.roformer_v2 import roformer_v2_init_std

from numerics import rel_err

VOCAB = 500


def spec_forward(state, num_heads, input_ids, token_type_ids, key_padding, segment_ids=None, eps=1e-12):
    """RoFormerV2 written out from the spec, one sequence at a time, float64, explicit pair rotation."""
    s = {k: v.double() for k, v in state.items()}
    norm = lambda x: x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)  # noqa: E731  parameter-free RMS
    outputs = []
    for b in range(input_ids.shape[0]):
        x = s["roformer.embeddings.word_embeddings.weight"][input_ids[b]]
        x = norm(x + s["roformer.embeddings.token_type_embeddings.weight"][token_type_ids[b]])
        L, H = x.shape
        d = H // num_heads
        angle = torch.tensor([[p * 10000 ** (-2 * i / d) for i in range(d // 2)] for p in range(L)], dtype=torch.float64)

        def rope(t):  # t [L, heads, d]: rotate (t[2i], t[2i+1]) by angle[p, i]
            even, odd = t[..., 0::2], t[..., 1::2]
            c, sn = angle.cos()[:, None], angle.sin()[:, None]
            return torch.stack([even * c - odd * sn, odd * c + even * sn], -1).flatten(-2)

        visible = key_padding[b][None, :].expand(L, L).clone()
        if segment_ids is not None:
            cum = segment_ids[b].cumsum(0)
            visible &= cum[None, :] <= cum[:, None]
        for i in range(len([k for k in s if k.endswith("attention.self.query.weight")])):
            p = f"roformer.encoder.layer.{i}."
            q = rope((x @ s[p + "attention.self.query.weight"].T).view(L, num_heads, d))
            k = rope((x @ s[p + "attention.self.key.weight"].T).view(L, num_heads, d))
            v = (x @ s[p + "attention.self.value.weight"].T).view(L, num_heads, d)
            scores = torch.einsum("ihd,jhd->hij", q, k) / math.sqrt(d)
            probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
            attn = torch.einsum("hij,jhd->ihd", probs, v).reshape(L, H)
            x = norm(x + attn @ s[p + "attention.output.dense.weight"].T)
            ffn = torch.relu(x @ s[p + "intermediate.dense.weight"].T) @ s[p + "output.dense.weight"].T
            x = norm(x + ffn)
        outputs.append(x @ s["roformer.embeddings.word_embeddings.weight"].T)  # tied head, no bias
    return outputs


def padded_batch():
    ids = torch.randint(106, VOCAB, (3, 21))
    lengths = torch.tensor([21, 14, 5])
    mask = torch.arange(21)[None, :] < lengths[:, None]
    return ids * mask, mask


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_matches_spec_forward_with_padding(backend):
    model = build_model("roformer_v2", "tiny", vocab_size=VOCAB, dropout=0.0, attention_backend=backend).eval()
    ids, mask = padded_batch()
    types = torch.zeros_like(ids)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask, token_type_ids=types).logits
    expected = spec_forward(checkpoint_state(model), 2, ids, types, mask)
    for b in range(3):
        n = int(mask[b].sum())
        assert rel_err(logits[b, :n].double(), expected[b][:n]) < 1e-5


def test_unilm_matches_spec_and_is_causal_on_the_target():
    model = build_model("roformer_v2", "tiny", vocab_size=VOCAB, dropout=0.0).eval()
    ids, mask = padded_batch()
    seg = ((torch.arange(21)[None, :] >= torch.tensor([12, 6, 2])[:, None]) & mask).long()
    with torch.no_grad():
        logits = model(ids, attention_mask=mask, token_type_ids=seg, unilm=True).logits
        expected = spec_forward(checkpoint_state(model), 2, ids, seg, mask, segment_ids=seg)
        for b in range(3):
            n = int(mask[b].sum())
            assert rel_err(logits[b, :n].double(), expected[b][:n]) < 1e-5
        changed = ids.clone()
        changed[0, 16:] = torch.randint(106, VOCAB, (5,))
        after = model(changed, attention_mask=mask, token_type_ids=seg, unilm=True).logits
    assert torch.allclose(after[0, :16], logits[0, :16], atol=1e-6)  # source and earlier target unaffected
    assert not torch.allclose(after[0, 16:], logits[0, 16:], atol=1e-3)


def test_no_biases_parameter_free_norms_and_tied_head():
    model = build_model("roformer_v2", "base")
    names = [n for n, _ in model.named_parameters()]
    assert not any("bias" in n or "norm" in n.lower() for n in names)
    assert model.mlm_head.weight is model.embeddings.word_embeddings.weight
    assert round(sum(p.numel() for p in model.parameters()) / 1e6) == 94


def test_initialisation_follows_the_spec():
    """std 1/sqrt(fan_in * layers) after truncation at +-2 sigma; fan is the hidden size for embeddings."""
    model = build_model("roformer_v2", "base")
    L, H, I = 12, 768, 3072
    layer = model.layers[0]
    cases = {
        "query": (layer.attention.query.weight, H),
        "ffn_in": (layer.ffn_in.weight, H),
        "ffn_out": (layer.ffn_out.weight, I),
        "word_embeddings": (model.embeddings.word_embeddings.weight, H),
        "token_type": (model.embeddings.token_type_embeddings.weight, H),
    }
    for name, (w, fan) in cases.items():
        sigma = 1.13684723 / math.sqrt(fan * L)
        assert w.abs().max().item() <= 2 * sigma + 1e-7, name
        if w.numel() > 10000:
            assert w.std().item() == pytest.approx(1 / math.sqrt(fan * L), rel=0.03), name
    assert roformer_v2_init_std((12000, H), L) == roformer_v2_init_std((H, H), L)  # (V, H) embedding: fan = H


def test_junnyu_layout_round_trip_and_ignored_rotary_table(tmp_path):
    from safetensors.torch import load_file, save_file

    model = build_model("roformer_v2", "tiny", vocab_size=VOCAB, dropout=0.0).eval()
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "roformer" and cfg["use_bias"] is False and cfg["norm_type"] != "layer_norm"
    state = load_file(tmp_path / "model.safetensors")
    assert "roformer.encoder.layer.1.attention.self.query.weight" in state
    # What JunnYu's RoFormerForMaskedLM files carry besides: the tied head and the sinusoidal table.
    state["cls.predictions.decoder.weight"] = state["roformer.embeddings.word_embeddings.weight"].clone()
    state["roformer.encoder.embed_positions.weight"] = torch.zeros(512, 64)
    save_file(state, tmp_path / "model.safetensors")
    loaded = from_pretrained(tmp_path)
    ids, mask = padded_batch()
    with torch.no_grad():
        assert torch.equal(loaded(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits)


def test_roformer_v1_checkpoint_is_rejected(tmp_path):
    build_model("roformer_v2", "tiny", vocab_size=VOCAB).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update(use_bias=True, norm_type="layer_norm")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="RoFormer v1"):
        from_pretrained(tmp_path)


def test_untied_head_in_file_is_an_error(tmp_path):
    from safetensors.torch import load_file, save_file

    build_model("roformer_v2", "tiny", vocab_size=VOCAB).save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["cls.predictions.decoder.weight"] = torch.randn(VOCAB, 128)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="cls.predictions.decoder.weight differs"):
        from_pretrained(tmp_path)
