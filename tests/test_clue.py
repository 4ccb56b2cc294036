"""CLUE-format benchmark files, read as published: AFQMC (sentence pairs, JSON lines) into the similarity task and
CLUENER2020 (entity spans, JSON lines) into the NER task. None of these files can be downloaded here: each reader
is exercised on lines written in the published format (CLUENER's first line is its README's example)."""
import json

import pytest
import torch

from suformer.config import FinetuneConfig, load_config
from suformer.models import build_model
from suformer.finetune.tasks import task_for
from suformer.finetune.tasks.ner import CLUENER_TYPES, read_cluener
from suformer.finetune.tasks.similarity import read_clue_pairs, similarity_splits

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


@pytest.mark.parametrize("name, read", [("train.json", read_clue_pairs), ("train.tsv", "csl")])
def test_a_gbk_file_is_named_with_its_first_line_that_is_not_utf8(tmp_path, name, read):
    from suformer.finetune.tasks.title import read_csl

    path = tmp_path / name
    good = ('{"sentence1": "花呗", "sentence2": "借呗", "label": "1"}\n' if name.endswith("json") else "标题\t摘要\n")
    path.write_bytes(good.encode("utf-8") * 2 + good.encode("gbk"))
    with pytest.raises(ValueError, match=rf"{name}:3: not UTF-8 text"):
        (read_csl if read == "csl" else read)(path)


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


TNEWS_LABELS = [("100", "news_story"), ("101", "news_culture"), ("102", "news_entertainment"),
                ("103", "news_sports"), ("104", "news_finance"), ("106", "news_house"), ("107", "news_car"),
                ("108", "news_edu"), ("109", "news_tech"), ("110", "news_military"), ("112", "news_travel"),
                ("113", "news_world"), ("114", "news_stock"), ("115", "news_agriculture"), ("116", "news_game")]


def tnews_folder(folder, news, reviews):
    """TNEWS' layout; sentences that can be told apart: news openings as news_finance, reviews as
    news_entertainment (the classes are only names here)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_lines(folder / "labels.json", [{"label": k, "label_desc": d} for k, d in TNEWS_LABELS])

    def rows(texts, label, desc):
        return [{"label": label, "label_desc": desc, "sentence": t[:30], "keywords": ""} for t in texts]

    write_lines(folder / "train.json", [r for pair in zip(rows(news[:100], "104", "news_finance"),
                                                           rows(reviews[:100], "102", "news_entertainment"))
                                        for r in pair])
    write_lines(folder / "dev.json", rows(news[200:230], "104", "news_finance")
                + rows(reviews[1200:1230], "102", "news_entertainment"))
    write_lines(folder / "test.json", [{"id": 0, "sentence": "没有标签", "keywords": ""}])  # never read
    return folder


def test_clue_classification_trains_under_adafactor_with_clues_dev_set_as_the_test_set(tmp_path, news, reviews):
    from suformer.finetune.loop import finetune

    folder = tnews_folder(tmp_path / "tnews", news, reviews)
    cfg = FinetuneConfig.model_validate({
        "data": {"task": "classification", "path": str(folder), "max_len": 32},
        "train": {"epochs": 8, "batch_size": 16, "lr": 1e-2, "optimizer": "adafactor", "threads": 2},
        "run": {"root": str(tmp_path)}})
    task = task_for(cfg)
    assert len(task.labels) == 15 and task.labels[4] == "104"
    splits = task.splits()
    assert (len(splits["train"]), len(splits["dev"]), len(splits["test"])) == (180, 20, 60)
    assert splits["test"][0] == (news[200][:30], 4) and splits["test"][-1] == (reviews[1229][:30], 2)
    epochs = []
    out = finetune(cfg, report=epochs.append, splits=splits)
    assert epochs[-1]["train/loss"] < epochs[0]["train/loss"]
    assert epochs[-1]["train/lr"] < 1e-12 and 0 < epochs[0]["train/lr"] < 1e-2  # linear decay to 0
    assert out["metrics"]["test/accuracy"] > 0.8  # two balanced classes (0.97 when written)


def test_clue_classification_input_problems_are_named(tmp_path, news, reviews):
    folder = tnews_folder(tmp_path / "tnews", news, reviews)
    with (folder / "train.json").open("a", encoding="utf-8") as f:
        f.write(json.dumps({"label": "105", "sentence": "没有这个类"}, ensure_ascii=False) + "\n")
    cfg = FinetuneConfig.model_validate({"data": {"task": "classification", "path": str(folder)},
                                         "run": {"root": str(tmp_path)}})
    with pytest.raises(ValueError, match=r"train\.json:201: label '105' is not in labels\.json"):
        task_for(cfg).splits()
    (folder / "labels.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"CLUE's labels\.json not found"):
        task_for(cfg)
    with pytest.raises(ValueError, match=r"train.optimizer=adafactor runs without DeepSpeed"):
        FinetuneConfig.model_validate({"data": {"task": "classification", "path": str(folder)},
                                       "train": {"optimizer": "adafactor", "zero_stage": 1}})


# -- CSL title generation (t5-pegasus finetune.py's files) ----------------------------------------------------------

def csl_folder(folder, news):
    """t5-pegasus' CSL layout, `title<TAB>content` lines; here a paragraph's opening words are its 'title'."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.tsv", news[:240]), ("val.tsv", news[300:316]), ("test.tsv", news[400:416])):
        (folder / name).write_text("".join(f"{t[:10]}\t{t[:80]}\n" for t in rows), encoding="utf-8")
    return folder


def test_csl_reader_takes_title_tab_content_and_names_bad_lines(tmp_path):
    from suformer.finetune.tasks.title import read_csl

    good = tmp_path / "train.tsv"
    good.write_bytes("\ufeff基于BERT的标题生成\t本文提出一种方法。\r\n\r\n另一个标题\t另一段摘要\r\n".encode("utf-8"))
    assert read_csl(good) == [("本文提出一种方法。", "基于BERT的标题生成"), ("另一段摘要", "另一个标题")]
    good.write_text("只有标题\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"train\.tsv:1: expected title<TAB>content, got 1 field"):
        read_csl(good)
    good.write_text("标题\t摘要\n标题\t\t摘要\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"train\.tsv:2: expected title<TAB>content, got 3 field"):
        read_csl(good)


def test_title_task_fine_tunes_t5_pegasus_and_scores_beam_search_as_su_does(tmp_path, news):
    from suformer.finetune.tasks.seq2seq import char_rouge_bleu
    from suformer.finetune.loop import finetune

    folder = csl_folder(tmp_path / "csl", news)
    cfg = FinetuneConfig.model_validate({
        "model": {"family": "t5_pegasus"},
        "data": {"task": "title", "path": str(folder), "max_len": 48, "max_target_len": 12, "num_beams": 2},
        "train": {"epochs": 2, "batch_size": 16, "lr": 3e-3, "schedule": "constant", "threads": 2},
        "run": {"root": str(tmp_path)}})
    task = task_for(cfg)
    splits = task.splits()
    assert [len(splits[s]) for s in ("train", "dev", "test")] == [240, 16, 16]
    assert splits["test"][0] == (news[400][:80], news[400][:10])
    epochs = []
    out = finetune(cfg, report=epochs.append, splits=splits)
    assert epochs[-1]["train/loss"] < epochs[0]["train/loss"]
    assert [e["train/lr"] for e in epochs] == [3e-3, 3e-3]  # Su's constant rate
    assert "dev/bleu" in epochs[0] and all(0 <= out["metrics"][f"test/{k}"] <= 1
                                           for k in ("rouge_1", "rouge_2", "rouge_l", "bleu"))
    # The scores lowercase both sides, as Su's script does.
    assert char_rouge_bleu(["BERT模型"], ["bert模型"])["rouge_1"] == pytest.approx(1.0)
