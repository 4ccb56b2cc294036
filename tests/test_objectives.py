"""Pretraining objectives against slow references, masking statistics, the Parquet schema round trip."""
import itertools
import random
from collections import Counter

import jieba
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from suformer.config import DataSection
from suformer.pretrain.data.dataset import examples_from_documents
from suformer.pretrain.data.objectives import OBJECTIVES
from suformer.pretrain.data.objectives.mlm import whole_word_mask
from suformer.pretrain.data.objectives.unilm import unilm_labels
from suformer.pretrain.data.objectives.pegasus import chunk_units, pseudo_summary, text_segmentate
from suformer.tokenizer import Tokenizer, normalize


def lcs_length(a: str, b: str) -> int:
    """Longest common subsequence by the textbook dynamic programme."""
    prev = [0] * (len(b) + 1)
    for ca in a:
        cur = [0]
        for j, cb in enumerate(b):
            cur.append(prev[j] + 1 if ca == cb else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def reference_pseudo_summary(units, summary_rate=0.25):
    """t5-pegasus train.py pseudo_summary, literally (pylcs.lcs replaced by the DP above)."""
    source_idxs, target_idxs = list(range(len(units))), []
    while True:
        sims = []
        for i in source_idxs:
            new_source = "".join(units[j] for j in source_idxs if j != i)
            new_target = "".join(units[j] for j in sorted(target_idxs + [i]))
            sims.append(lcs_length(new_source, new_target))
        new_idx = source_idxs[sims.index(max(sims))]
        source_idxs.remove(new_idx)
        target_idxs = sorted(target_idxs + [new_idx])
        source = "".join(units[j] for j in source_idxs)
        target = "".join(units[j] for j in target_idxs)
        if len(source_idxs) == 1 or len(target) / len(source) > summary_rate:
            break
    if len(source) < len(target):
        source, target = target, source
    return source, target


def test_pseudo_summary_equals_the_reference_on_real_text(news):
    chunks = [c for doc in news[:400] for c in chunk_units(doc, 32, 240, 3)][:40]
    assert len(chunks) >= 20
    for units in chunks:
        assert pseudo_summary(units) == reference_pseudo_summary(units)


def test_summary_is_just_over_a_quarter_and_units_are_kept_in_order(news):
    for units in [c for doc in news[:200] for c in chunk_units(doc)][:20]:
        source, target = pseudo_summary(units)
        assert len(target) / len(source) > 0.25 or len(units) == 2
        assert sorted(source + target) == sorted("".join(units))  # units move, nothing is lost or masked


def test_segmentation_keeps_every_character_and_respects_the_unit_length(news):
    for doc in news[:300]:
        units = text_segmentate(doc, 32, "\n。")
        assert "".join(units) == doc.strip()
        for u in units:
            assert len(u) <= 32 or ("。" not in u[:-1])  # only separator-free runs may stay long
        for chunk in chunk_units(doc):
            assert len(chunk) >= 3


def test_whole_word_masking_statistics(char_vocab_file, news):
    tok = Tokenizer(char_vocab_file, pre_tokenize=None)
    rng = random.Random(0)
    kinds = Counter()
    words_total = 0
    for doc in news[:600]:
        ((ids, labels),) = whole_word_mask(doc, tok, rng, max_len=10_000)
        # Words are encoded one at a time (train_mlm.py: tokenizer.encode(w)[0][1:-1]).
        words = list(jieba.cut(normalize(doc), HMM=False))
        original = [tok.cls_id] + [i for w in words for i in tok.encode(w)[1:-1]] + [tok.sep_id]
        assert len(ids) == len(labels) == len(original)
        pos = 1
        for word in words:
            n = len(tok.encode(word)) - 2
            if n <= 0:
                continue
            span = range(pos, pos + n)
            chosen = {labels[i] != -100 for i in span}
            assert len(chosen) == 1  # whole words: all of a word's tokens or none
            words_total += 1
            if chosen.pop():
                assert [labels[i] for i in span] == original[pos : pos + n]
                if all(ids[i] == tok.mask_id for i in span):
                    kinds["mask"] += 1
                elif [ids[i] for i in span] == original[pos : pos + n]:
                    kinds["keep"] += 1
                else:
                    kinds["random"] += 1
            else:
                assert [ids[i] for i in span] == original[pos : pos + n]
            pos += n
    selected = sum(kinds.values())
    assert selected / words_total == pytest.approx(0.15, abs=0.01)
    assert kinds["mask"] / selected == pytest.approx(0.8, abs=0.03)
    assert kinds["keep"] / selected == pytest.approx(0.1, abs=0.03)
    assert kinds["random"] / selected == pytest.approx(0.1, abs=0.03)


def test_long_documents_become_several_mlm_examples_and_keep_every_token(char_vocab_file, news):
    tok = Tokenizer(char_vocab_file, pre_tokenize=None)
    doc = "".join(news[:40])  # thousands of characters
    words = list(jieba.cut(normalize(doc), HMM=False))
    original = [i for w in words for i in tok.encode(w)[1:-1]]
    # Mask rate ~0: inputs are the plain tokens, so the pieces must concatenate to the whole document.
    pieces = whole_word_mask(doc, tok, random.Random(0), max_len=64, mask_rate=1e-9)
    assert len(pieces) >= len(original) // 62
    assert all(len(ids) <= 64 and ids[0] == tok.cls_id and ids[-1] == tok.sep_id for ids, _ in pieces)
    assert [i for ids, _ in pieces for i in ids[1:-1]] == original
    # Cuts fall between words: each piece's tokens are a whole run of words.
    boundaries = set(itertools.accumulate(len(tok.encode(w)) - 2 for w in words))
    assert all(end in boundaries for end in itertools.accumulate(len(ids) - 2 for ids, _ in pieces))


def test_unilm_labels_predict_the_next_target_token():
    ids, seg = [101, 5, 6, 102, 7, 8, 102], [0, 0, 0, 0, 1, 1, 1]
    assert unilm_labels(ids, seg) == [-100, -100, -100, 7, 8, 102, -100]  # the source [SEP] predicts the first


@pytest.mark.parametrize("objective", ["pegasus", "mlm", "unilm"])
def test_examples_round_trip_through_parquet(objective, tmp_path, news, vocab_file, char_vocab_file):
    data = DataSection(objective=objective, max_source_len=64, max_target_len=16, max_len=64)
    tok = Tokenizer(vocab_file if objective == "pegasus" else char_vocab_file,
                    pre_tokenize="jieba" if objective == "pegasus" else None)
    columns = examples_from_documents(news[:150], data, tok)
    table = pa.Table.from_pydict(columns, schema=OBJECTIVES[objective].schema)
    pq.write_table(table, tmp_path / "shard.parquet", row_group_size=16)
    back = pq.read_table(tmp_path / "shard.parquet")
    assert back.schema == OBJECTIVES[objective].schema and back.to_pydict() == columns and back.num_rows > 10
    assert all(n == len(ids) <= 64 for n, ids in zip(columns["num_tokens"], columns["input_ids"]))
    assert all(ids[0] == tok.cls_id and ids[-1] == tok.sep_id for ids in columns["input_ids"])
    # Pure function of the documents: a second pass, in another batch split, gives the same rows.
    again = {k: [] for k in columns}
    for part in (news[:70], news[70:150]):
        for k, v in examples_from_documents(part, data, tok).items():
            again[k] += v
    assert again == columns
