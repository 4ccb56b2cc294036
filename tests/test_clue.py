"""CLUE-format benchmark files, read as published: AFQMC (sentence pairs, JSON lines) into the similarity task and
CLUENER2020 (entity spans, JSON lines) into the NER task. None of these files can be downloaded here: each reader
is exercised on lines written in the published format (CLUENER's first line is its README's example)."""
import json

import pytest
import torch

from suformer.config import FinetuneConfig, load_config
from suformer.models import build_model
from suformer.tasks import task_for
from suformer.tasks.ner import CLUENER_TYPES, read_cluener
from suformer.tasks.similarity import read_clue_pairs, similarity_splits

from test_convert import REPO

CLUENER_LINES = [
    {"text": "浙商银行企业信贷部叶老桂博士则从另一个角度对五道门槛进行了解读。叶老桂认为，对目前国内商业银行而言，",
     "label": {"name": {"叶老桂": [[9, 11], [32, 34]]}, "company": {"浙商银行": [[0, 3]]}}},
    {"text": "生生不息CSOL生化狂潮让你填弹狂扫", "label": {"game": {"CSOL": [[4, 7]]}}},
    {"text": "今天天气很好。", "label": {}},
]


def write_lines(path, rows, newline="\n", bom=False):
    text = newline.join(json.dumps(r, ensure_ascii=False) for r in rows) + newline
    path.write_bytes(("\ufeff" if bom else "").encode() + text.encode("utf-8"))
    return path


def afqmc_rows(news, n):
    return [{"sentence1": news[i][:18], "sentence2": news[i + 1][:18], "label": str(i % 2)} for i in range(n)]


def test_afqmc_folder_splits_with_clues_dev_set_as_the_test_set(tmp_path, news):
    write_lines(tmp_path / "train.json", afqmc_rows(news, 40), newline="\r\n", bom=True)  # as Windows tools save
    write_lines(tmp_path / "dev.json", afqmc_rows(news[100:], 10))
    write_lines(tmp_path / "test.json", [{"sentence1": "a", "sentence2": "b"}])  # unlabelled: never read
    splits = similarity_splits(tmp_path, seed=3)
    train = [(r["sentence1"], r["sentence2"], float(r["label"])) for r in afqmc_rows(news, 40)]
    assert splits["test"] == [(r["sentence1"], r["sentence2"], float(r["label"])) for r in afqmc_rows(news[100:], 10)]
    assert len(splits["dev"]) == 4 and sorted(splits["train"] + splits["dev"]) == sorted(train)
    assert similarity_splits(tmp_path, seed=3) == splits and similarity_splits(tmp_path, seed=4) != splits


def test_afqmc_lines_without_a_label_or_json_are_named(tmp_path):
    bad = write_lines(tmp_path / "test.json", [{"sentence1": "花呗", "sentence2": "借呗", "label": "1"},
                                               {"sentence1": "花呗", "sentence2": "借呗"}])
    with pytest.raises(ValueError, match=r"test\.json:2: no 'label' field .*CLUE's test\.json has no labels"):
        read_clue_pairs(bad)
    bad.write_text('{"sentence1": "花呗", "sentence2": "借呗", "label": "1"}\n{"sentence1": "花呗",\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"test\.json:2: not JSON"):
        read_clue_pairs(bad)


def test_cluener_spans_are_read_with_inclusive_ends(tmp_path):
    sentences = read_cluener(write_lines(tmp_path / "train.json", CLUENER_LINES))
    assert [s.spans for s in sentences] == [((0, 3, "company"), (9, 11, "name"), (32, 34, "name")),
                                            ((4, 7, "game"),), ()]
    for sentence in sentences:
        for start, end, _ in sentence.spans:
            assert sentence.text[start:end + 1] in ("浙商银行", "叶老桂", "CSOL")


@pytest.mark.parametrize("label, message", [
    ({"name": {"叶老桂": [[8, 10]]}}, r"train\.json:1: name span \[8, 10\] is '部叶老', not '叶老桂'"),
    ({"person": {"叶老桂": [[9, 11]]}}, r"train\.json:1: entity type 'person' is not one of CLUENER's"),
    ({"name": {"叶老桂": [9, 11]}}, r"train\.json:1: name: expected \{entity: \[\[start, end\], \.\.\.\]\}"),
    (None, r"train\.json:1: expected .*CLUE's test\.json has no labels"),
])
def test_cluener_lines_that_do_not_spell_their_entities_are_named(tmp_path, label, message):
    row = {"text": CLUENER_LINES[0]["text"], **({"label": label} if label is not None else {})}
    with pytest.raises(ValueError, match=message):
        read_cluener(write_lines(tmp_path / "train.json", [row]))


def test_ner_task_on_a_cluener_folder_trains_a_pointer_over_its_ten_types(tmp_path, char_vocab_file):
    from suformer.tokenizer import Tokenizer

    write_lines(tmp_path / "train.json", CLUENER_LINES * 4)
    write_lines(tmp_path / "dev.json", CLUENER_LINES[:2])
    cfg = load_config(str(REPO / "jobs" / "configs" / "finetune_ner_tiny_cpu.yaml"), [f"data.path={tmp_path}"],
                      schema=FinetuneConfig)
    task = task_for(cfg)
    splits = task.splits()
    assert (len(splits["train"]), len(splits["dev"]), len(splits["test"])) == (11, 1, 2)
    features = task.encode(splits["test"], Tokenizer(char_vocab_file, pre_tokenize=None))
    assert features[0][1] == {(CLUENER_TYPES.index("company"), 1, 4), (CLUENER_TYPES.index("name"), 10, 12),
                              (CLUENER_TYPES.index("name"), 33, 35)}  # token i + 1 is character i
    batch = task.collate(features)
    assert batch["labels"].shape[1] == 10 and batch["labels"].sum() == 4
    model = task.head(build_model("roformer_v2", "tiny", dropout=0.0), None)
    out = model(**batch)
    assert out.logits.shape[1] == 10 and torch.isfinite(out.loss)
    out.loss.backward()
