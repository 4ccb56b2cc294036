"""T5 PEGASUS against transformers' MT5 (compat="hf"), the three bert4keras points one at a time, checkpoints."""
import json

import pytest
import torch
from torch import nn

from suformer.models import CheckpointError, build_model, from_pretrained

from numerics import rel_err

VOCAB, D = 320, 64
DIMS = dict(vocab_size=VOCAB, d_model=D, d_kv=16, num_heads=4, d_ff=96, num_layers=2, num_decoder_layers=3)


def hf_mt5(feed_forward_proj="gated-gelu"):
    """A random, untied transformers MT5 (the T5 PEGASUS port's layout), eager attention, no dropout."""
    from transformers import MT5Config, MT5ForConditionalGeneration

    config = MT5Config(**DIMS, feed_forward_proj=feed_forward_proj, dropout_rate=0.0, attn_implementation="eager")
    model = MT5ForConditionalGeneration(config)
    model.lm_head.weight = nn.Parameter(torch.randn(VOCAB, D) * D**-0.5)
    return model.eval()


def add_bert4keras_cross_bias(hf):
    """Give transformers' decoder cross-attention the decoder self-attention table, as bert4keras does: block 0
    computes bias(q_len, k_len) unidirectionally (= T_dec[bucket(max(i-j, 0))]) and later blocks reuse it."""
    cross = hf.decoder.block[0].layer[1].EncDecAttention
    cross.has_relative_attention_bias = True
    cross.relative_attention_bias = hf.decoder.block[0].layer[0].SelfAttention.relative_attention_bias
    return hf


def batch():
    """Padded encoder batch and a decoder longer than max_distance 128 so the far buckets are used."""
    B, Lx, Ly = 3, 40, 150
    x = torch.randint(106, VOCAB, (B, Lx))
    y = torch.randint(106, VOCAB, (B, Ly))
    x_mask = torch.ones(B, Lx, dtype=torch.long)
    x_mask[1, 31:] = 0
    x_mask[2, 9:] = 0
    y_mask = torch.ones(B, Ly, dtype=torch.long)
    y_mask[0, 140:] = 0
    return dict(input_ids=x * x_mask, attention_mask=x_mask, decoder_input_ids=y * y_mask, decoder_attention_mask=y_mask)


def logits_on_real_tokens(model, inputs):
    if hasattr(model, "generation_config"):  # a transformers model
        inputs = {**inputs, "use_cache": False}  # else block 0's cross bias would see the self-attention cache length
    with torch.no_grad():
        return model(**inputs).logits[inputs["decoder_attention_mask"].bool()]


@pytest.fixture
def hf_dir(tmp_path):
    hf = hf_mt5()
    hf.save_pretrained(tmp_path)
    return hf, tmp_path


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_hf_compat_matches_transformers_mt5(hf_dir, backend):
    hf, path = hf_dir
    ours = from_pretrained(path, compat="hf", attention_backend=backend)
    inputs = batch()
    assert rel_err(logits_on_real_tokens(ours, inputs), logits_on_real_tokens(hf, inputs)) < 1e-4


def test_hf_compat_tied_head_scales_like_transformers_t5(tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration

    hf = T5ForConditionalGeneration(
        T5Config(**DIMS, feed_forward_proj="gated-gelu", tie_word_embeddings=True, dropout_rate=0.0,
                 attn_implementation="eager")
    ).eval()
    hf.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path, compat="hf")
    assert ours.config.tie_word_embeddings and ours.config.scale_decoder_output
    inputs = batch()
    assert rel_err(logits_on_real_tokens(ours, inputs), logits_on_real_tokens(hf, inputs)) < 1e-4


# The three documented differences, each switched on alone in an otherwise-hf model and compared with
# transformers changed in that one way only.
def test_point_exact_gelu(hf_dir, tmp_path):
    hf, path = hf_dir
    ours = from_pretrained(path, compat="hf", gelu_approximate="none")
    hf_erf = hf_mt5("gated-gelu_python")  # transformers' exact-erf GELU
    hf_erf.load_state_dict(hf.state_dict())
    inputs = batch()
    assert rel_err(logits_on_real_tokens(ours, inputs), logits_on_real_tokens(hf_erf, inputs)) < 1e-4
    assert rel_err(logits_on_real_tokens(ours, inputs), logits_on_real_tokens(hf, inputs)) > 1e-4


def test_point_decoder_output_scale(hf_dir):
    hf, path = hf_dir
    ours = from_pretrained(path, compat="hf", scale_decoder_output=True)
    inputs = batch()
    expected = logits_on_real_tokens(hf, inputs) * D**-0.5  # the head is linear and bias-free
    assert rel_err(logits_on_real_tokens(ours, inputs), expected) < 1e-4


def test_point_cross_attention_bias(hf_dir):
    hf, path = hf_dir
    ours = from_pretrained(path, compat="hf", cross_attention_bias=True)
    inputs = batch()
    plain = logits_on_real_tokens(hf, inputs)
    expected = logits_on_real_tokens(add_bert4keras_cross_bias(hf), inputs)
    assert rel_err(logits_on_real_tokens(ours, inputs), expected) < 1e-4
    assert rel_err(expected, plain) > 1e-3


def test_default_is_bert4keras_all_three_points(hf_dir):
    hf, path = hf_dir
    ours = from_pretrained(path)
    c = ours.config
    assert (c.compat, c.gelu_approximate, c.scale_decoder_output, c.cross_attention_bias) == ("bert4keras", "none", True, True)
    hf_b4k = hf_mt5("gated-gelu_python")
    hf_b4k.load_state_dict(hf.state_dict())
    add_bert4keras_cross_bias(hf_b4k)
    inputs = batch()
    expected = logits_on_real_tokens(hf_b4k, inputs) * D**-0.5
    assert rel_err(logits_on_real_tokens(ours, inputs), expected) < 1e-4


@pytest.mark.parametrize("compat", ["bert4keras", "hf"])
def test_encoder_padding_does_not_change_outputs(compat):
    model = build_model("t5_pegasus", "tiny", vocab_size=VOCAB, dropout=0.0, compat=compat).eval()
    inputs = batch()
    with torch.no_grad():
        together = model(**inputs)
        for b in range(3):
            n = int(inputs["attention_mask"][b].sum())
            alone = model(
                inputs["input_ids"][b : b + 1, :n], decoder_input_ids=inputs["decoder_input_ids"][b : b + 1],
                decoder_attention_mask=inputs["decoder_attention_mask"][b : b + 1],
            )
            assert rel_err(together.encoder_hidden_states[b, :n], alone.encoder_hidden_states[0]) < 1e-5
            keep = inputs["decoder_attention_mask"][b].bool()
            assert rel_err(together.logits[b][keep], alone.logits[0][keep]) < 1e-5


def test_loss_is_token_cross_entropy_and_labels_shift_right():
    model = build_model("t5_pegasus", "tiny", vocab_size=VOCAB, dropout=0.0).eval()
    x = torch.randint(106, VOCAB, (2, 9))
    labels = torch.randint(106, VOCAB, (2, 6))
    labels[1, 4:] = -100
    out = model(x, labels=labels)
    dec_in = torch.cat([torch.full((2, 1), 101), labels[:, :-1].clamp(min=0)], 1)
    manual = model(x, decoder_input_ids=dec_in).logits
    keep = labels != -100
    expected = -manual.log_softmax(-1)[keep].gather(1, labels[keep][:, None]).mean()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_pad_as_decoder_start_sees_itself():
    """mT5-style decoding starts from [PAD]; the default mask keeps position 0 visible as bert4keras does."""
    model = build_model("t5_pegasus", "tiny", vocab_size=VOCAB, dropout=0.0, decoder_start_token_id=0).eval()
    x = torch.randint(106, VOCAB, (2, 7))
    y = torch.cat([torch.zeros(2, 1, dtype=torch.long), torch.randint(106, VOCAB, (2, 4))], 1)
    with torch.no_grad():
        implicit = model(x, decoder_input_ids=y).logits
        explicit = model(x, decoder_input_ids=y, decoder_attention_mask=torch.ones_like(y)).logits
    assert torch.equal(implicit, explicit)


def test_presets_have_the_published_sizes():
    with torch.device("meta"):
        base = build_model("t5_pegasus", "base")
        small = build_model("t5_pegasus", "small")
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert round(count(base) / 1e6) == 275 and round(count(small) / 1e6) == 95
    assert small.config.num_heads * small.config.head_dim == 384


# -- checkpoints ---------------------------------------------------------------------------------------------------
def test_hf_compat_save_load_round_trip_through_transformers(tmp_path):
    from transformers import MT5ForConditionalGeneration

    ours = build_model("t5_pegasus", "tiny", vocab_size=VOCAB, dropout=0.0, compat="hf").eval()
    ours.save_pretrained(tmp_path)
    hf = MT5ForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="eager").eval()
    inputs = batch()
    assert rel_err(logits_on_real_tokens(hf, inputs), logits_on_real_tokens(ours, inputs)) < 1e-5
    back = from_pretrained(tmp_path)  # the file records compat="hf"
    assert torch.equal(logits_on_real_tokens(back, inputs), logits_on_real_tokens(ours, inputs))


def test_bert4keras_export_loads_back_exactly_and_into_transformers(tmp_path):
    from transformers import MT5ForConditionalGeneration

    ours = build_model("t5_pegasus", "tiny", vocab_size=VOCAB, dropout=0.0).eval()
    ours.save_pretrained(tmp_path)
    inputs = batch()
    expected = logits_on_real_tokens(ours, inputs)
    assert rel_err(logits_on_real_tokens(from_pretrained(tmp_path), inputs), expected) < 1e-6
    # transformers gets the same function except the cross-attention bias it cannot express (exact GELU and
    # the pre-scaled head travel in the file).
    hf = MT5ForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert rel_err(logits_on_real_tokens(add_bert4keras_cross_bias(hf), inputs), expected) < 1e-5


def test_pytorch_model_bin_with_tied_aliases_loads(hf_dir, tmp_path):
    hf, path = hf_dir
    state = hf.state_dict()
    state["encoder.embed_tokens.weight"] = state["shared.weight"]
    state["decoder.embed_tokens.weight"] = state["shared.weight"]
    torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    ours = from_pretrained(tmp_path, compat="hf")
    inputs = batch()
    assert rel_err(logits_on_real_tokens(ours, inputs), logits_on_real_tokens(hf, inputs)) < 1e-4


def _rewrite(path, edit_state=None, edit_config=None):
    from safetensors.torch import load_file, save_file

    if edit_state:
        state = load_file(path / "model.safetensors")
        edit_state(state)
        save_file(state, path / "model.safetensors")
    if edit_config:
        cfg = json.loads((path / "config.json").read_text())
        edit_config(cfg)
        (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "edit_state, edit_config, message",
    [
        (lambda s: s.pop("decoder.block.1.layer.2.DenseReluDense.wo.weight"), None,
         r"missing keys \(1\): decoder\.block\.1\.layer\.2\.DenseReluDense\.wo\.weight"),
        (lambda s: s.__setitem__("encoder.block.0.layer.0.SelfAttention.q.bias", torch.zeros(64)), None,
         r"unexpected keys \(1\): encoder\.block\.0\.layer\.0\.SelfAttention\.q\.bias"),
        (None, lambda c: c.__setitem__("vocab_size", 999), r"shared\.weight: checkpoint \(320, 64\) vs model \(999, 64\)"),
        (None, lambda c: c.__setitem__("num_decoder_layers", 2), r"unexpected keys .*decoder\.block\.2\."),
        (None, lambda c: c.pop("d_model"), r"missing field 'd_model'"),
        (None, lambda c: c.__setitem__("feed_forward_proj", "relu"), r"feed_forward_proj='relu'"),
    ],
)
def test_mismatched_checkpoints_name_the_problem(hf_dir, edit_state, edit_config, message):
    _, path = hf_dir
    _rewrite(path, edit_state, edit_config)
    with pytest.raises(CheckpointError, match=message):
        from_pretrained(path)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="config.json: not found"):
        from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mt5"}))
    with pytest.raises(CheckpointError, match="no weights file"):
        from_pretrained(tmp_path)
