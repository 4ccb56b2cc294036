"""`jobs/convert.py mt5-to-t5-pegasus`: every row of the converted embedding and LM head against the published
re-indexing (ZhuiyiTechnology/t5-pegasus train.py + bert4keras' keep_tokens/compound_tokens loading), written out
here step by step; the rest of mT5 carried over unchanged; mT5's function kept under compat="hf"."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from suformer.models import from_pretrained
from suformer.tokenizer import load_vocab

from conftest import TRANSPLANT_TOKENS

REPO = Path(__file__).resolve().parents[1]
UNK = 2  # mT5's <unk>: the published code compares lookups with this literal


def convert_main():
    spec = importlib.util.spec_from_file_location("convert_job", REPO / "jobs" / "convert.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def sentencepiece_of(mt5_dir):
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=str(mt5_dir / "spiece.model"))


def published_reindexing(vocab: list[str], sp, table: np.ndarray):
    """(new vocab order, new rows, how each token was placed) as the published code computes them: a `keep` list
    of sentencepiece ids (106 times <unk>, then each found token's), the kept table `table[keep]`, and compound
    rows averaged over that kept table at `position of the piece's id in keep` (its last position; 0 if absent)."""
    keep, placed, order = [UNK] * 106, {}, list(vocab[:106])
    for token in vocab[106:]:
        if token[:2] == "##":
            found = sp.piece_to_id(token[2:])
            placed[token] = "##" if found != UNK else "##quirk"
            if found == UNK:
                found = sp.piece_to_id("\u2581" + token)
        else:
            found = sp.piece_to_id("\u2581" + token)
            placed[token] = "word-with-prefix" if found != UNK else "word"
            if found == UNK:
                found = sp.piece_to_id(token)
        if found != UNK:
            keep.append(found)
            order.append(token)
    position = {}
    for index, piece_id in enumerate(keep):
        position[piece_id] = index
    kept = table[keep].astype(np.float64)
    compound_rows = []
    for token in vocab:
        if token not in order[:len(keep)]:
            placed[token] = "compound"
            pieces = [position.get(sp.piece_to_id(p), 0) for p in sp.encode_as_pieces(token)]
            compound_rows.append(kept[pieces].mean(0))
            order.append(token)
    return order, np.concatenate([kept, np.array(compound_rows)]), placed


@pytest.fixture(scope="module")
def converted(tiny_mt5, tmp_path_factory):
    mt5_dir, vocab = tiny_mt5
    out = tmp_path_factory.mktemp("converted") / "t5_pegasus"
    assert convert_main()(["mt5-to-t5-pegasus", "--mt5", str(mt5_dir), "--vocab", str(vocab), "--out", str(out)]) == 0
    return out


def test_every_row_follows_the_published_reindexing(tiny_mt5, converted):
    mt5_dir, vocab_file = tiny_mt5
    sp, mt5 = sentencepiece_of(mt5_dir), load_file(mt5_dir / "model.safetensors")
    vocab = list(load_vocab(vocab_file))
    order, shared, placed = published_reindexing(vocab, sp, mt5["shared.weight"].numpy())
    _, head, _ = published_reindexing(vocab, sp, mt5["lm_head.weight"].numpy())

    assert list(load_vocab(converted / "vocab.txt")) == order
    assert json.loads((converted / "tokenizer_config.json").read_text())["pre_tokenize"] == "jieba"
    model = from_pretrained(converted)  # as trained: bert4keras semantics, the raw mT5 head behind the scale
    assert model.config.compat == "bert4keras" and not model.config.tie_word_embeddings
    np.testing.assert_allclose(model.shared.weight.detach().double().numpy(), shared, rtol=0, atol=1e-6)
    np.testing.assert_allclose(model.lm_head.weight.detach().double().numpy(), head, rtol=0, atol=1e-6)

    kinds = [placed[t] for t in vocab[106:]]
    assert {k: kinds.count(k) > 0 for k in ("##", "##quirk", "word", "word-with-prefix", "compound")} == dict.fromkeys(
        ("##", "##quirk", "word", "word-with-prefix", "compound"), True)
    assert [placed[t] for t in TRANSPLANT_TOKENS] == ["##", "##quirk", "word-with-prefix", "compound"]
    quirk = order.index("##喵喵")  # found only as "▁##喵喵": that piece's row, as published
    assert torch.equal(model.shared.weight[quirk], mt5["shared.weight"][sp.piece_to_id("\u2581##喵喵")])
    assert torch.equal(model.shared.weight[:106], mt5["shared.weight"][UNK].expand(106, -1))


def test_every_other_weight_is_mt5s(tiny_mt5, converted):
    mt5 = load_file(tiny_mt5[0] / "model.safetensors")
    ours = load_file(converted / "model.safetensors")
    vocab_tables = {"shared.weight", "lm_head.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight"}
    rest = sorted(set(mt5) - vocab_tables)
    assert rest and set(ours) - vocab_tables == set(rest)
    for key in rest:
        assert torch.equal(ours[key], mt5[key]), key


def test_hf_compat_keeps_mt5s_logits_for_tokens_found_in_its_vocab(tiny_mt5, tmp_path):
    from transformers import MT5ForConditionalGeneration

    mt5_dir, vocab = tiny_mt5
    out = tmp_path / "hf"
    assert convert_main()(["mt5-to-t5-pegasus", "--mt5", str(mt5_dir), "--vocab", str(vocab), "--out", str(out),
                           "--compat", "hf"]) == 0
    sp, tokens = sentencepiece_of(mt5_dir), list(load_vocab(out / "vocab.txt"))
    found = {i: sp.piece_to_id(t[2:] if t[:2] == "##" else t) for i, t in enumerate(tokens[106:], 106)
             if sp.piece_to_id(t[2:] if t[:2] == "##" else t) != UNK}
    ours_ids = torch.tensor(sorted(found)[:200:4])
    theirs_ids = torch.tensor([found[int(i)] for i in ours_ids])
    x, y = ours_ids[:30].view(2, 15), ours_ids[30:46].view(2, 8)
    model = from_pretrained(out)
    mt5 = MT5ForConditionalGeneration.from_pretrained(mt5_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        ours = model(input_ids=x, decoder_input_ids=y).logits
        theirs = mt5(input_ids=theirs_ids[torch.searchsorted(ours_ids, x)],
                     decoder_input_ids=theirs_ids[torch.searchsorted(ours_ids, y)], use_cache=False).logits
    torch.testing.assert_close(ours[..., ours_ids], theirs[..., theirs_ids], rtol=1e-5, atol=1e-5)


def test_bad_inputs_exit_2_naming_the_problem_and_write_nothing(tiny_mt5, tmp_path, capsys):
    mt5_dir, vocab = tiny_mt5
    main = convert_main()
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    args = ["mt5-to-t5-pegasus", "--mt5", str(mt5_dir), "--vocab", str(vocab), "--out"]
    assert main(args + [str(taken)]) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err and (taken / "keep.txt").read_text() == "mine"

    no_specials = tmp_path / "chars.txt"
    no_specials.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n的\n", encoding="utf-8")  # a vocab, but not BERT's layout
    out = tmp_path / "out"
    assert main(["mt5-to-t5-pegasus", "--mt5", str(mt5_dir), "--vocab", str(no_specials), "--out", str(out)]) == 2
    assert "must start with the 106 BERT-style specials" in capsys.readouterr().err

    no_spm = tmp_path / "no_spm"
    no_spm.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_spm / name).write_bytes((mt5_dir / name).read_bytes())
    assert main(["mt5-to-t5-pegasus", "--mt5", str(no_spm), "--vocab", str(vocab), "--out", str(out)]) == 2
    assert "no sentencepiece model (spiece.model" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".out.*"))
