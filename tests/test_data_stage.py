"""The data stage on a real Ray cluster against obvious references: the vocab counted by Ray Data equals the
single-process builder on the same documents; the shards hold every example exactly once, shuffled out of corpus
order; the counts of what was skipped or repaired add up across formats."""
import json

import pyarrow.parquet as pq
import pytest

from suformer.config import DataSection
from suformer.pretrain.data import dataset
from suformer.pretrain.data.dataset import ensure_vocab, prepare_shards, shard_files
from suformer.tokenizer import build_vocab, load_vocab

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("objective", ["pegasus", "mlm"])
def test_the_cluster_counted_vocab_equals_the_single_process_builder(ray_cluster, tmp_path, news, objective):
    corpus = tmp_path / "news.txt"
    corpus.write_text("\n".join(news[:400]) + "\n")
    data = DataSection(corpus=str(corpus), txt_documents="line", vocab_size=3000, objective=objective)
    built = load_vocab(ensure_vocab(data, tmp_path).local_file())
    expected = build_vocab([d.strip() for d in news[:400] if d.strip()], 3000, words=objective == "pegasus")
    assert list(built) == expected


def test_a_sampled_vocab_is_reproducible_and_counts_about_the_sample_size(ray_cluster, tmp_path, news):
    corpus = tmp_path / "news.txt"
    corpus.write_text("\n".join(news[:1500]) + "\n")  # ~0.7 MiB
    data = DataSection(corpus=str(corpus), txt_documents="line", vocab_size=100_000, objective="mlm",
                       vocab_sample_mb=0.1)
    first = ensure_vocab(data, tmp_path / "a")
    assert first.read_bytes() == ensure_vocab(data, tmp_path / "b").read_bytes()
    full = build_vocab(news[:1500], 100_000, words=False)
    assert 0.3 * len(full) < len(load_vocab(first.local_file())) < len(full)  # a sample: fewer distinct characters
    other = ensure_vocab(data.model_copy(update={"seed": 1}), tmp_path / "c")
    assert other.read_bytes() != first.read_bytes()


def test_shards_hold_every_example_once_shuffled_out_of_corpus_order(ray_cluster, tmp_path, char_vocab_file, news,
                                                                      monkeypatch):
    # One MLM example per document (short documents); a document's number is its first 4 characters (Chinese
    # digits: one token each in the char vocab).
    digits = "零一二三四五六七八九"
    docs = ["".join(digits[int(c)] for c in f"{i:04d}") + news[i][:40] for i in range(1500)]
    corpus = tmp_path / "numbered.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs))
    data = DataSection(corpus=str(corpus), objective="mlm", mask_rate=1e-9, max_len=128, rows_per_shard=200)
    # Three shuffle partitions, as a corpus of a few hundred MB gets: rows cross partitions and each is sorted.
    monkeypatch.setattr(dataset, "SHUFFLE_PARTITION_BYTES", corpus.stat().st_size // 3 + 1)
    vocab = {i: t for t, i in load_vocab(char_vocab_file).items()}

    def documents_in_shard_order(shards):
        return [int("".join(str(digits.index(vocab[i])) for i in ids[1:5])) for path in shard_files(shards)
                for ids in pq.read_table(path, columns=["input_ids"]).column(0).to_pylist()]

    shards = prepare_shards(data, char_vocab_file, tmp_path)
    order = documents_in_shard_order(shards)
    assert sorted(order) == list(range(1500))
    # Shuffled: a random permutation's rank correlation with corpus order is ~0 (|rho| < 0.1 by far here).
    n = len(order)
    rho = 1 - 6 * sum((pos - doc) ** 2 for pos, doc in enumerate(order)) / (n * (n * n - 1))
    assert abs(rho) < 0.1
    ready = json.loads((shards / "_READY.json").read_text())
    assert ready["examples"] == ready["documents"] == 1500 and max(ready["shard_rows"].values()) <= 200
    # Seeded: the same seed shuffles the same way in another build, another seed otherwise.
    assert documents_in_shard_order(prepare_shards(data, char_vocab_file, tmp_path / "again")) == order
    other = documents_in_shard_order(prepare_shards(data.model_copy(update={"seed": 1}), char_vocab_file,
                                                    tmp_path / "other"))
    assert sorted(other) == sorted(order) and other != order


def test_counts_add_up_across_formats(ray_cluster, tmp_path, char_vocab_file, news):
    import pyarrow as pa

    short = [d.strip() for d in news if 0 < len(d.strip()) < 300][:60]
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_bytes(b"\n".join(d.encode() for d in short[:30]) + b"\n\n\n\xff\xfe\x00x\n")
    (tmp_path / "c" / "b.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in short[30:50] + [""]))
    pq.write_table(pa.table({"text": short[50:60] + [None, "长" * 500]}), tmp_path / "c" / "d.parquet")
    data = DataSection(corpus=str(tmp_path / "c"), objective="mlm", txt_documents="line", max_len=64,
                       max_document_chars=400)
    ready = json.loads((prepare_shards(data, char_vocab_file, tmp_path) / "_READY.json").read_text())
    assert {k: ready[k] for k in ("documents", "skipped_empty_documents", "skipped_overlong_documents",
                                  "documents_with_nul", "undecodable_lines")} == {
        "documents": 61, "skipped_empty_documents": 2 + 1 + 1, "skipped_overlong_documents": 1,
        "documents_with_nul": 1, "undecodable_lines": 1}
    assert ready["examples"] >= 61  # long documents make several MLM examples, none is lost


def test_a_corpus_on_object_storage_makes_the_same_examples_as_on_disk(ray_cluster, s3_server, tmp_path,
                                                                        char_vocab_file, news):
    # A real S3 API (moto's server): the driver lists and samples the objects, the cluster's tasks read them.
    files = {"part-0.txt": "\n\n".join(news[:150]) + "\n",
             "part-1.jsonl": "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in news[150:300])}
    (tmp_path / "local").mkdir()
    for name, text in files.items():
        (tmp_path / "local" / name).write_text(text)
        with s3_server.fs.open_output_stream(f"{s3_server.bucket}/corpus/{name}") as f:
            f.write(text.encode())
    settings = dict(objective="mlm", max_len=64, rows_per_shard=100)

    def examples(corpus, root):
        shards = prepare_shards(DataSection(corpus=corpus, **settings), char_vocab_file, root)
        rows = [r for p in shard_files(shards) for r in pq.read_table(p, filesystem=shards.fs).to_pylist()]
        ready = json.loads((shards / "_READY.json").read_text())
        counts = {k: v for k, v in ready.items() if k not in ("shard_rows", "build")}
        return sorted(rows, key=lambda r: r["input_ids"]), counts

    # corpus and shards on S3, against both on disk
    on_s3 = examples(f"s3://{s3_server.bucket}/corpus", f"s3://{s3_server.bucket}/{tmp_path.name}")

    on_disk = examples(str(tmp_path / "local"), tmp_path / "b")
    assert on_s3 == on_disk and on_s3[1]["documents"] == 300
