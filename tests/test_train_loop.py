"""Pieces of the pretraining worker loop, each against an obvious reference: the metric sums, the micro-batch
stream read from the worker's Parquet files (order across epochs, resume positions, what a resume reads), and
checkpoint pruning."""
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch

from suformer.pretrain.batches import StreamPosition, micro_batches, redeal, step_sums
from suformer.pretrain.validation import Validation, split_validation


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


def _stream(files, position, count, micro=4, rank=0, world=1):
    stream = micro_batches(files, rank, world, "pegasus", micro, None, position)
    return [next(stream) for _ in range(count)]


def _examples(batch) -> list[tuple[int, int]]:
    """(file, row) of each row of a micro-batch of `_shards` rows."""
    return [(ids[0] - 100, ids[1] - 1) for ids in batch["input_ids"].tolist()]


def _rest_of_epoch(files, position, rank, world, micro=3):
    """The examples a worker reads from `position` until its epoch ends."""
    seen = []
    for batch, after in micro_batches(files, rank, world, "pegasus", micro, None, position):
        if after.epoch != position.epoch:
            return seen
        seen += _examples(batch)


def test_validation_holds_out_the_fewest_last_files_that_hold_its_examples():
    files, rows = ["a", "b", "c", "d"], [40, 30, 20, 25]
    assert split_validation(files, rows, 0) == (files, [])
    assert split_validation(files, rows, 25) == (["a", "b", "c"], ["d"])
    assert split_validation(files, rows, 26) == (["a", "b"], ["c", "d"])
    assert split_validation(files, rows, 1000) == ([], files)


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_validation_shares_cover_the_held_out_examples_once_with_equal_forwards_per_rank(tmp_path, world):
    files = _shards(tmp_path, [10, 7])  # 15 examples wanted: all of file 0, the first 5 of file 1
    shares = [Validation(files, 15, pafs.LocalFileSystem(), "pegasus", 4, rank, world) for rank in range(world)]
    seen = sorted(e for share in shares for batch in share.batches for e in _examples(batch))
    assert seen == sorted([(0, r) for r in range(10)] + [(1, r) for r in range(5)])
    assert len({share.forwards for share in shares}) == 1  # ZeRO-3 gathers parameters in every forward
    assert all(len(share.batches) <= share.forwards and share.spare["input_ids"].shape[0] > 0 for share in shares)


@pytest.mark.parametrize("worlds", [(2, 1), (2, 3), (3, 2, 1), (1, 4)])
def test_a_change_of_worker_count_mid_epoch_still_uses_every_example_once(tmp_path, worlds):
    """Workers read part of an epoch, the run resumes with another number of workers (and possibly again, from
    a re-dealt share), and the new workers finish the epoch: together they used every example of the shards once,
    and from the next epoch on each worker reads its own files again."""
    sizes = [10, 7, 12, 5, 9, 3, 8, 11]
    files = _shards(tmp_path, sizes)
    everything = sorted((f, r) for f, n in enumerate(sizes) for r in range(n))
    used = []
    positions = [StreamPosition()] * worlds[0]
    for old, new in zip(worlds, worlds[1:]):
        for rank in range(old):  # as in training: every worker takes the same number of micro-batches
            for batch, positions[rank] in _stream(files, positions[rank], 2, micro=3, rank=rank, world=old):
                assert positions[rank].epoch == 0  # every share is longer than 6 rows: all within epoch 0
                used += _examples(batch)
        positions = [redeal(positions, files, rank, new) for rank in range(new)]
    for rank, position in enumerate(positions):
        used += _rest_of_epoch(files, position, rank, worlds[-1])
    assert sorted(used) == everything
    for rank in range(worlds[-1]):
        [(batch, after)] = _stream(files, StreamPosition(1), 1, micro=3, rank=rank, world=worlds[-1])
        assert after.dealt is None and _examples(batch)[0][0] == rank


def _checkpoint(storage: Path, step: int, complete: bool = True) -> None:
    folder = storage / f"step-{step:08d}"
    folder.mkdir(parents=True)
    (folder / "train_state.json").write_text(json.dumps({"step": step, "world_size": 1}))
    (folder / "weights.pt").write_bytes(b"x" * 64)
    if complete:  # a rank's manifest, written last: its files and their sizes
        (folder / "manifest_rank0.json").write_text(json.dumps({p.name: p.stat().st_size for p in folder.iterdir()}))


def test_keep_checkpoints_prunes_folders_ray_train_never_registered_and_nothing_it_did(tmp_path):
    from suformer.pretrain.run_checkpoints import prune_unregistered_checkpoints

    for step in (10, 20, 30, 40, 50, 60):
        _checkpoint(tmp_path, step, complete=step != 60)  # 60: still being written
    # A killed driver's attempt wrote 10-30, of which Ray Train registered 10; the resubmission registered 40, 50.
    (tmp_path / "checkpoint_manager_snapshot.json").write_text(json.dumps(
        {"checkpoint_results": [{"checkpoint_dir_name": f"step-{s:08d}"} for s in (10, 40, 50)]}))

    pruned = prune_unregistered_checkpoints(tmp_path, keep=2)

    assert sorted(p.name for p in pruned) == ["step-00000020", "step-00000030"]
    assert sorted(p.name for p in tmp_path.glob("step-*")) == [f"step-{s:08d}" for s in (10, 40, 50, 60)]


def test_nothing_is_pruned_before_ray_train_has_registered_a_newer_checkpoint(tmp_path):
    from suformer.pretrain.run_checkpoints import prune_unregistered_checkpoints

    for step in (10, 20, 30):
        _checkpoint(tmp_path, step)
    assert prune_unregistered_checkpoints(tmp_path, keep=1) == []  # no snapshot yet: 10 and 20 may still register
    (tmp_path / "checkpoint_manager_snapshot.json").write_text(json.dumps({"paths": [str(tmp_path / "step-00000010")]}))
    assert prune_unregistered_checkpoints(tmp_path, keep=1) == []  # 20 may still be registered after 10
    assert len(list(tmp_path.glob("step-*"))) == 3
