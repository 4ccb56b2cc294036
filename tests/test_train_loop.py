"""Pieces of the pretraining worker loop, each against an obvious reference: the metric sums, the micro-batch
stream read from the worker's Parquet files (order across epochs, resume positions, what a resume reads), and
checkpoint pruning."""
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from suformer.train.batches import StreamPosition, collate, micro_batches
from suformer.train.loop import step_sums


def test_step_sums_count_what_argmax_counts():
    torch.manual_seed(0)
    logits = torch.randn(4, 9, 50)
    labels = torch.randint(0, 50, (4, 9))
    labels[:2, :4] = logits[:2, :4].argmax(-1)  # some right answers
    labels[:, 7:] = -100  # nothing predicted there
    batch = {"labels": labels, "input_ids": torch.tensor([[5, 6, 0, 0], [7, 0, 0, 0], [1, 2, 3, 4], [9, 9, 9, 0]]),
             "decoder_input_ids": torch.tensor([[3, 0], [4, 4], [0, 0], [8, 0]])}
    loss = torch.tensor(2.5)

    sums = step_sums(loss, logits, batch)

    predicted = labels != -100
    correct = sum(int(logits[i, t].argmax() == labels[i, t]) for i in range(4) for t in range(9) if predicted[i, t])
    assert correct >= 8
    assert sums.dtype == torch.float64
    assert sums.tolist() == [2.5 * 28, correct, 28, 10 + 4]  # non-pad encoder + decoder inputs


def _shards(tmp_path, sizes):
    """Parquet files of PEGASUS rows whose ids say where they come from: (file, row) -> input_ids [file, row]."""
    files = []
    for f, n in enumerate(sizes):
        rows = [{"input_ids": [100 + f, 1 + r, 2], "target_ids": [1, 500 + r, 2], "num_tokens": 3} for r in range(n)]
        path = tmp_path / f"shard-{f:05d}.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=7)
        files.append(str(path))
    return files


def _stream(files, position, count, micro=4):
    stream = micro_batches(files, "pegasus", micro, None, position)
    return [next(stream) for _ in range(count)]


def test_micro_batches_cycle_epochs_in_order_and_resume_mid_epoch(tmp_path):
    files = _shards(tmp_path, [10, 7])  # 17 rows an epoch: 4 full micro-batches and one of a single row
    got = _stream(files, StreamPosition(), 12)

    rows = pq.read_table(files[0]).to_pylist() + pq.read_table(files[1]).to_pylist()
    expected = []
    for epoch in range(3):  # the obvious reading: each epoch in file order, cut into fours
        for start in range(0, 17, 4):
            chunk = rows[start:start + 4]
            end = start + len(chunk)  # rows consumed in the epoch: file 0 holds the first 10
            position = StreamPosition(epoch, 0, end) if end <= 10 else StreamPosition(epoch, 1, end - 10)
            expected.append((collate("pegasus", chunk), position))
    for (batch, pos), (want, want_pos) in zip(got, expected[:12]):
        assert pos == want_pos
        assert {k: v.tolist() for k, v in batch.items()} == {k: v.tolist() for k, v in want.items()}

    for resume_at in (2, 6, 9):  # mid-file 0, mid-file 1 of epoch 1 (past a row group), the end of epoch 1
        resumed = _stream(files, got[resume_at][1], 3)
        for (batch, pos), (want, want_pos) in zip(resumed, got[resume_at + 1:resume_at + 4]):
            assert pos == want_pos and torch.equal(batch["input_ids"], want["input_ids"])


def test_a_resume_reads_only_the_rest_of_its_file(tmp_path, monkeypatch):
    files = _shards(tmp_path, [70, 70])  # row groups of 7
    groups_read = []
    real = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group",
                        lambda self, i, *a, **k: groups_read.append(i) or real(self, i, *a, **k))
    [(batch, _)] = _stream(files, StreamPosition(0, 1, 64), 1)
    assert batch["input_ids"][:, :2].tolist() == [[101, 65], [101, 66], [101, 67], [101, 68]]
    assert groups_read[0] == 9  # rows 63-69 of file 1: nothing before the position was read


def test_checkpoints_saved_before_positions_named_a_file_resume_at_the_same_row(tmp_path):
    files = _shards(tmp_path, [10, 7])
    fs = pafs.LocalFileSystem()
    assert StreamPosition.saved({"epoch": 2, "rows": 4}, files, fs) == StreamPosition(2, 0, 4)
    assert StreamPosition.saved({"epoch": 2, "rows": 13}, files, fs) == StreamPosition(2, 1, 3)
    assert StreamPosition.saved({"epoch": 1, "file": 1, "row": 3}, files, fs) == StreamPosition(1, 1, 3)


def _checkpoint(storage: Path, step: int, complete: bool = True) -> None:
    folder = storage / f"step-{step:08d}"
    folder.mkdir(parents=True)
    (folder / "train_state.json").write_text(json.dumps({"step": step, "world_size": 1}))
    (folder / "weights.pt").write_bytes(b"x" * 64)
    if complete:  # a rank's manifest, written last: its files and their sizes
        (folder / "manifest_rank0.json").write_text(json.dumps({p.name: p.stat().st_size for p in folder.iterdir()}))


def test_keep_checkpoints_prunes_folders_ray_train_never_registered_and_nothing_it_did(tmp_path):
    from suformer.train.loop import prune_unregistered_checkpoints

    for step in (10, 20, 30, 40, 50, 60):
        _checkpoint(tmp_path, step, complete=step != 60)  # 60: still being written
    # A killed driver's attempt wrote 10-30, of which Ray Train registered 10; the resubmission registered 40, 50.
    (tmp_path / "checkpoint_manager_snapshot.json").write_text(json.dumps(
        {"checkpoint_results": [{"checkpoint_dir_name": f"step-{s:08d}"} for s in (10, 40, 50)]}))

    pruned = prune_unregistered_checkpoints(tmp_path, keep=2)

    assert sorted(p.name for p in pruned) == ["step-00000020", "step-00000030"]
    assert sorted(p.name for p in tmp_path.glob("step-*")) == [f"step-{s:08d}" for s in (10, 40, 50, 60)]


def test_nothing_is_pruned_before_ray_train_has_registered_a_newer_checkpoint(tmp_path):
    from suformer.train.loop import prune_unregistered_checkpoints

    for step in (10, 20, 30):
        _checkpoint(tmp_path, step)
    assert prune_unregistered_checkpoints(tmp_path, keep=1) == []  # no snapshot yet: 10 and 20 may still register
    (tmp_path / "checkpoint_manager_snapshot.json").write_text(json.dumps({"paths": [str(tmp_path / "step-00000010")]}))
    assert prune_unregistered_checkpoints(tmp_path, keep=1) == []  # 20 may still be registered after 10
    assert len(list(tmp_path.glob("step-*"))) == 3
