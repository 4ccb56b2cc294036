"""Su's releases as published: bert4keras TensorFlow checkpoint folders, read without TensorFlow. The fixtures
(tests/fixtures/make_bert4keras_fixtures.py) were saved by TensorFlow under bert4keras' variable names, with the same
weights placed in the transformers layout by the spec's mapping table: both folders must give one model."""
import json
import shutil

import pytest
import torch

from suformer.models import CheckpointError, from_pretrained
from suformer.models.tf_checkpoint import TFCheckpoint, TFCheckpointError

from test_convert import REPO, convert_main

FIXTURES = REPO / "tests" / "fixtures"
T5, ROFORMER = "chinese_t5_pegasus_tiny", "chinese_roformer-v2-char_tiny"


def logits(model):
    ids = torch.tensor([[101, 110, 130, 140, 120, 102], [101, 149, 107, 102, 0, 0]])
    with torch.no_grad():
        if model.config.family == "t5_pegasus":
            return model(input_ids=ids, decoder_input_ids=ids[:, :4]).logits
        return model(input_ids=ids).logits


@pytest.mark.parametrize("name", [T5, ROFORMER])
def test_a_release_folder_loads_as_the_same_model_as_its_transformers_layout(name):
    released = from_pretrained(FIXTURES / "bert4keras" / name, attention_backend="reference")
    reference = from_pretrained(FIXTURES / "transformers" / name, attention_backend="reference")
    assert released.config == reference.config
    mine, theirs = released.state_dict(), reference.state_dict()
    assert mine.keys() == theirs.keys()
    for key in mine:
        assert torch.equal(mine[key], theirs[key]), key
    torch.testing.assert_close(logits(released), logits(reference), rtol=0, atol=0)


def test_t5_pegasus_is_read_with_the_bert4keras_semantics_it_was_trained_with():
    config = from_pretrained(FIXTURES / "bert4keras" / T5).config
    assert (config.compat, config.gelu_approximate, config.scale_decoder_output, config.cross_attention_bias) == (
        "bert4keras", "none", True, True)
    assert (config.d_model, config.num_heads, config.head_dim) == (16, 3, 12)  # heads * head size != d_model


@pytest.mark.parametrize("name,pre_tokenize", [(T5, "jieba"), (ROFORMER, None)])
def test_convert_job_writes_the_release_in_the_transformers_layout(name, pre_tokenize, tmp_path):
    out = tmp_path / "model"
    assert convert_main()(["bert4keras", "--src", str(FIXTURES / "bert4keras" / name), "--out", str(out)]) == 0
    assert json.loads((out / "tokenizer_config.json").read_text())["pre_tokenize"] == pre_tokenize
    assert (out / "vocab.txt").read_text(encoding="utf-8") == (FIXTURES / "bert4keras" / name / "vocab.txt").read_text(
        encoding="utf-8")
    reference = from_pretrained(FIXTURES / "transformers" / name, attention_backend="reference")
    torch.testing.assert_close(logits(from_pretrained(out, attention_backend="reference")), logits(reference))


def test_the_reader_skips_optimizer_slots_and_step_counters():
    names = TFCheckpoint(FIXTURES / "bert4keras" / T5 / "model.ckpt").names()
    assert "global_step" in names and any(n.endswith("/adam_m") for n in names)  # they are there, and ignored
    model = from_pretrained(FIXTURES / "bert4keras" / T5)
    assert sum(p.numel() for p in model.parameters()) == sum(
        t.numel() for t in from_pretrained(FIXTURES / "transformers" / T5).parameters())


def test_damaged_or_foreign_checkpoints_are_named(tmp_path):
    v1 = FIXTURES / "bert4keras" / "roformer_v1_tiny"
    with pytest.raises(CheckpointError, match=r"bert_model\.ckpt\.index: variables the roformer_v2 layout does not "
                                              r"have \(LayerNorm gains/biases: a RoFormer v1 or BERT checkpoint"):
        from_pretrained(v1)

    damaged = tmp_path / "damaged"
    shutil.copytree(FIXTURES / "bert4keras" / ROFORMER, damaged)
    data = damaged / "bert_model.ckpt.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"bert_model\.ckpt\.data-00000-of-00001: truncated \("):
        from_pretrained(damaged)
    index = damaged / "bert_model.ckpt.index"
    index.write_bytes(index.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(TFCheckpointError, match=r"bert_model\.ckpt\.index: not a TensorFlow checkpoint index"):
        TFCheckpoint(damaged / "bert_model.ckpt")
    index.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"bert_model\.ckpt\.index: 0 bytes, too short"):
        from_pretrained(damaged)
