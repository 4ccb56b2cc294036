"""Reading real corpora: formats, document boundaries, encodings, directories and compressed files, the cleaning
rules and their counts, and the exit-2 preflight for every bad input (no Ray needed: the reader's per-file code is
the one Ray Data runs)."""
import gzip
from collections import Counter

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from suformer.config import DataSection
from suformer.pretrain.data.corpus import DataError, file_documents, list_corpus, preflight
from suformer.pretrain.data.dataset import check_makes_examples, data_fingerprint

from test_config import pretrain_main


def read(corpus, **settings) -> list[dict]:
    """Every document row the cluster's reader makes of `corpus`, in order."""
    data = DataSection(corpus=str(corpus), **settings)
    fs, files = list_corpus(data.corpus)
    rows = []
    for file in files:
        opened = fs.open_input_file if file.kind == "parquet" else fs.open_input_stream
        with opened(file.path, **({} if file.kind == "parquet" else {"compression": "detect"})) as f:
            rows += file_documents(f, file.kind, file.path, data)
    return rows


def texts(rows):
    return [r["text"] for r in rows if not r["skipped"]]


def counts(rows):
    return Counter({"documents": len(texts(rows)), **Counter(f"skipped_{r['skipped']}" for r in rows if r["skipped"]),
                    "nul": sum(r["nul"] for r in rows), "undecodable": sum(r["undecodable_lines"] for r in rows)})


def run_job(tmp_path, data_yaml: str) -> int:
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {{family: t5_pegasus}}\ndata: {data_yaml}\n")
    return pretrain_main()(["--config", str(config), "--set", f"run.root={tmp_path / 'runs'}"])


def test_one_document_per_line_skips_and_counts_what_it_cannot_train_on(tmp_path):
    corpus = tmp_path / "mixed.txt"
    corpus.write_bytes(
        "第一篇文章。\n".encode()
        + b"\n   \n"                                       # two empty documents
        + "含有\x00空字符的文章\n".encode()                  # NUL removed, document kept
        + b"\xff\xfe broken bytes \xe4\xb8\n"            # not UTF-8: replacement characters, kept
        + ("很长" * 40 + "\n").encode()                     # over the limit below: skipped
        + "最后一篇。".encode()                              # no trailing newline
    )
    rows = read(corpus, txt_documents="line", max_document_chars=50)
    assert texts(rows) == ["第一篇文章。", "含有空字符的文章", "\ufffd\ufffd broken bytes \ufffd", "最后一篇。"]
    assert counts(rows) == Counter(documents=4, skipped_empty=2, nul=1, undecodable=1, skipped_overlong=1)


def test_blank_lines_separate_documents_of_one_sentence_per_line(tmp_path):
    corpus = tmp_path / "bert_style.txt"
    # Windows line endings and a UTF-8 byte-order mark, as Notepad writes them; runs of blank lines.
    corpus.write_bytes("\ufeff第一句。\r\n第二句。\r\n\r\n\r\n第三句。\r\n  \r\n第四句。\r\n第五句。".encode())
    assert texts(read(corpus)) == ["第一句。\n第二句。", "第三句。", "第四句。\n第五句。"]
    assert texts(read(corpus, txt_documents="line")) == ["第一句。", "第二句。", "第三句。", "第四句。", "第五句。"]


def test_a_long_blank_line_document_is_cut_at_lines_and_loses_nothing(tmp_path):
    lines = [f"这是第{i}句话。" * 3 for i in range(200)]
    corpus = tmp_path / "one_document.txt"
    corpus.write_text("\n".join(lines) + "\n")
    docs = texts(read(corpus, max_document_chars=300))
    assert len(docs) > 10 and all(len(d) <= 300 for d in docs)
    assert [line for d in docs for line in d.split("\n")] == lines


def test_compressed_and_plain_files_read_the_same(tmp_path):
    text = "甲。\n乙。\n\n丙。\n"
    (tmp_path / "plain.txt").write_text(text)
    with gzip.open(tmp_path / "packed.txt.gz", "wt", encoding="utf-8") as f:
        f.write(text)
    assert texts(read(tmp_path / "packed.txt.gz")) == texts(read(tmp_path / "plain.txt")) == ["甲。\n乙。", "丙。"]


def test_a_directory_means_its_corpus_files(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "1.txt").write_text("一。\n")
    (tmp_path / "a" / "2.jsonl").write_text('{"text": "二。"}\n')
    (tmp_path / "a" / ".hidden.txt").write_text("不读。\n")
    (tmp_path / "a" / "_SUCCESS").write_text("")
    assert texts(read(tmp_path / "a")) == ["一。", "二。"]
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.csv").write_text("x\n")
    with pytest.raises(DataError, match=r"directory .*b' holds no \.txt, \.jsonl or \.parquet file \(it holds: csv\)"):
        list_corpus(str(tmp_path / "b"))


def test_jsonl_fields_and_their_errors_name_the_line(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"content": "好", "id": 1}\n\n{"content": null}\n')
    assert texts(read(corpus, text_key="content")) == ["好"]
    with pytest.raises(DataError, match=r"c\.jsonl:1: no 'text' field \(found: \['content', 'id'\]\); set data\.text_key"):
        preflight(DataSection(corpus=str(corpus)))
    corpus.write_text('{"text": "好"}\n\n{"text": 42}\n')
    with pytest.raises(DataError, match=r"c\.jsonl:3: 'text' is int, expected a string"):
        preflight(DataSection(corpus=str(corpus)))
    corpus.write_text('{"text": "好"}\n{"text": "坏"\n')
    with pytest.raises(DataError, match=r"c\.jsonl:2: not a JSON object"):
        preflight(DataSection(corpus=str(corpus)))


def test_parquet_reads_one_column_and_names_a_missing_one(tmp_path):
    corpus = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": ["甲", None, "", "乙"], "other": [1, 2, 3, 4]}), corpus)
    rows = read(corpus)
    assert texts(rows) == ["甲", "乙"] and counts(rows)["skipped_empty"] == 2
    pq.write_table(pa.table({"body": ["甲"]}), corpus)
    with pytest.raises(DataError, match=r"c\.parquet: no 'text' column \(columns: \['body'\]\); set data\.text_key"):
        preflight(DataSection(corpus=str(corpus)))


def test_corrupt_parquet_corpus_exits_2_naming_the_file(tmp_path, capsys):
    corpus = tmp_path / "broken.parquet"
    pq.write_table(pa.table({"text": ["甲"] * 100}), corpus)
    corpus.write_bytes(corpus.read_bytes()[:-20])  # truncated: footer gone
    assert run_job(tmp_path, f"{{corpus: '{corpus}'}}") == 2
    assert f"{corpus}: not a readable Parquet file" in capsys.readouterr().err


def test_a_gbk_corpus_exits_2_naming_the_encoding_and_reads_with_it(tmp_path, capsys, news):
    corpus = tmp_path / "gbk.txt"
    corpus.write_bytes("\n".join(news[:50]).encode("gbk"))
    assert run_job(tmp_path, f"{{corpus: '{corpus}'}}") == 2
    assert f"{corpus}: not UTF-8 text (50 of the first 50 lines cannot be decoded, the first at line 1); it looks " \
           "like gbk: set data.encoding=gbk" in capsys.readouterr().err
    rows = read(corpus, encoding="gbk", txt_documents="line")
    assert texts(rows) == [d.strip() for d in news[:50]] and counts(rows)["undecodable"] == 0


def test_a_few_bad_lines_are_repaired_not_refused(tmp_path, news):
    corpus = tmp_path / "mostly_utf8.txt"
    corpus.write_bytes(b"\n".join([d.encode() for d in news[:40]] + [b"\xb2\xbb\xca\xc7"]))
    _, _, sample = preflight(DataSection(corpus=str(corpus), txt_documents="line"))
    assert len(sample) == 41 and sample[-1]["undecodable_lines"] == 1


def test_one_sentence_per_line_makes_pegasus_examples_unless_read_as_documents(tmp_path, capsys, news):
    # People's Daily paragraphs, one sentence per line, a blank line between paragraphs (BERT's layout).
    paragraphs = ["\n".join(s + "。" for s in d.split("。") if s) for d in news[:300]]
    corpus = tmp_path / "sentences.txt"
    corpus.write_text("\n\n".join(paragraphs) + "\n")
    data = DataSection(corpus=str(corpus))
    check_makes_examples(data, preflight(data))  # the default reads documents: long enough for pseudo-summaries
    assert run_job(tmp_path, f"{{corpus: '{corpus}', txt_documents: line}}") == 2
    err = capsys.readouterr().err
    assert "none of the" in err and "makes a pegasus example: a pseudo-summary needs at least data.min_units=3" in err
    assert "set data.txt_documents=blank_line" in err


@pytest.mark.parametrize("content, message", [
    (b"", r"vocab has no \[PAD\] token"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe", "is not a UTF-8 text file"),
    ("[PAD]\n[UNK]\n[CLS]\n[SEP]\n甲\n".encode(), r"has no \[MASK\] token, which data\.objective=mlm needs"),
])
def test_a_bad_vocab_exits_2_naming_it(tmp_path, capsys, content, message):
    vocab = tmp_path / "vocab.txt"
    vocab.write_bytes(content)
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {{family: roformer_v2}}\ndata: {{objective: mlm, vocab: '{vocab}'}}\n")
    assert pretrain_main()(["--config", str(config)]) == 2
    import re

    assert re.search(f"data\\.vocab: .*{message}", capsys.readouterr().err)


def test_the_fingerprint_follows_the_files_not_the_glob(tmp_path):
    (tmp_path / "a.txt").write_text("甲。\n")
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n")
    data = DataSection(corpus=str(tmp_path / "*.txt"))

    def fingerprint():
        return data_fingerprint(data, vocab, list_corpus(data.corpus)[1])

    first = fingerprint()
    assert fingerprint() == first
    (tmp_path / "a.txt").write_text("甲。乙。\n")  # edited
    edited = fingerprint()
    (tmp_path / "b.txt").write_text("丙。\n")  # added under the same glob
    assert len({first, edited, fingerprint()}) == 3


def test_globs_and_lists_resolve_in_a_stable_order(tmp_path):
    for name in ("b.txt", "a.txt", "c.jsonl"):
        (tmp_path / name).write_text('{"text": "x"}\n' if name.endswith("jsonl") else "x\n")
    fs, files = list_corpus(f"{tmp_path}/*.txt, {tmp_path / 'c.jsonl'}")
    assert isinstance(fs, pafs.LocalFileSystem)
    assert [f.path.rsplit("/", 1)[1] for f in files] == ["a.txt", "b.txt", "c.jsonl"]
    assert [f.kind for f in files] == ["txt", "txt", "jsonl"]
    with pytest.raises(DataError, match=r"data\.corpus: '.*/\*\.json' matches no file"):
        list_corpus(f"{tmp_path}/*.json")
