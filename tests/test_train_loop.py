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

from suformer.pretrain.batches import Batching, StreamPosition, micro_batches, redeal, step_sums, token_counts
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
    assert sums.tolist() == [2.5 * 28, correct, 28]
    assert token_counts(batch) == (10 + 4, 16 + 8)  # non-pad encoder + decoder inputs; every position computed


# Rows of varied lengths whose first two ids say where they come from: (file, row) -> [100 + file, 1 + row, ...].
LENGTHS = [3, 9, 4, 14, 5, 7, 3, 12, 6, 4, 10, 5, 8]


def _row(f: int, r: int, objective: str) -> dict:
    n = LENGTHS[(f * 7 + r) % len(LENGTHS)]
    ids = [100 + f, 1 + r] + [5] * (n - 2)
    if objective == "mlm":
        return {"input_ids": ids, "labels": [-100, 7] + [-100] * (n - 2), "num_tokens": n}
    return {"input_ids": ids, "target_ids": [1, 500 + r, 2], "num_tokens": n}


def _shards(tmp_path, sizes, objective="pegasus"):
    files = []
    for f, n in enumerate(sizes):
        path = tmp_path / f"shard-{f:05d}.parquet"
        pq.write_table(pa.Table.from_pylist([_row(f, r, objective) for r in range(n)]), path, row_group_size=7)
        files.append(str(path))
    return files


# Each mode with a window of two micro-batches' worth of examples, so that windows end inside files, a position
# can sit inside a window, and packed rows hold several examples (capacity 16 tokens).
MODES = {"sequential": Batching("pegasus", "sequential", 3, window=2),
         "grouped": Batching("pegasus", "grouped", 3, window=2, seed=1),
         "grouped-token-budget": Batching("pegasus", "grouped", 3, max_tokens=24, window=2, seed=1),
         "packed": Batching("mlm", "packed", 2, window=3, capacity=16, seed=1)}


def _stream(files, position, count, batching, rank=0, world=1):
    stream = micro_batches(files, rank, world, batching, position)
    return [next(stream) for _ in range(count)]


def _examples(batch) -> list[tuple[int, int]]:
    """(file, row) of each example of a micro-batch of `_shards` rows, packed ones included."""
    found = []
    for r, ids in enumerate(batch["input_ids"].tolist()):
        documents = batch["document_ids"][r].tolist() if "document_ids" in batch else [1] * len(ids)
        starts = [t for t, d in enumerate(documents) if d and (t == 0 or documents[t - 1] != d)]
        found += [(ids[t] - 100, ids[t + 1] - 1) for t in starts]
    return found


def _rest_of_epoch(files, position, rank, world, batching):
    """The examples a worker reads from `position` until its epoch ends."""
    seen = []
    for batch, after in micro_batches(files, rank, world, batching, position):
        if after.epoch != position.epoch:
            return seen
        seen += _examples(batch)


def _objective_files(tmp_path, sizes, mode):
    return _shards(tmp_path, sizes, MODES[mode].objective)


@pytest.mark.parametrize("mode", list(MODES))
def test_an_epoch_uses_every_example_once_and_a_resume_continues_it_exactly(tmp_path, mode):
    """From every position the stream reached, a restarted stream yields exactly what the uninterrupted one did
    next; an epoch holds every example of the worker's files once; each micro-batch respects its limits."""
    sizes, batching = [10, 7, 12, 5], MODES[mode]
    files = _objective_files(tmp_path, sizes, mode)
    uninterrupted = _stream(files, StreamPosition(), 40, batching)
    first_epoch = [e for batch, after in uninterrupted if after.epoch == 0 for e in _examples(batch)]
    assert sorted(first_epoch) == sorted((f, r) for f, n in enumerate(sizes) for r in range(n))
    for i, (_, position) in enumerate(uninterrupted[:-3]):
        resumed = _stream(files, position, 3, batching)
        for (want, want_after), (got, got_after) in zip(uninterrupted[i + 1:i + 4], resumed):
            assert _examples(got) == _examples(want) and got_after == want_after, f"resumed after batch {i}"
    assert any(position.done for _, position in uninterrupted)  # resumes from inside a window were tried
    for batch, _ in uninterrupted:
        rows, length = batch["input_ids"].shape
        if mode == "packed":
            assert length <= batching.capacity and rows <= batching.micro_batch_size
        elif batching.max_tokens:
            assert rows * length <= batching.max_tokens
    assert max(batch["input_ids"].shape[0] for batch, _ in uninterrupted) == batching.micro_batch_size


def test_packing_and_grouping_leave_less_padding_than_reading_in_order(tmp_path):
    def real_share(batching, files):
        counts = [token_counts(batch) for batch, _ in _stream(files, StreamPosition(), 12, batching)]
        return sum(real for real, _ in counts) / sum(computed for _, computed in counts)

    (tmp_path / "p").mkdir(), (tmp_path / "m").mkdir()
    pegasus, mlm = _shards(tmp_path / "p", [30, 30]), _shards(tmp_path / "m", [30, 30], "mlm")
    sequential = real_share(Batching("pegasus", "sequential", 4, window=8), pegasus)
    assert real_share(Batching("pegasus", "grouped", 4, window=8), pegasus) > sequential + 0.1
    assert real_share(Batching("mlm", "packed", 4, window=8, capacity=16), mlm) > 0.9 > sequential + 0.1


@pytest.mark.parametrize("mode", ["grouped", "packed"])
def test_two_runs_of_the_same_config_plan_the_same_batches_whatever_folder_holds_the_shards(tmp_path, mode):
    """The data stage writes each build of the shards into a folder of its own: the plan must not depend on it."""
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    first, second = (_objective_files(tmp_path / name, [10, 7, 12], mode) for name in "ab")
    assert [_examples(b) for b, _ in _stream(first, StreamPosition(), 8, MODES[mode])] == \
        [_examples(b) for b, _ in _stream(second, StreamPosition(), 8, MODES[mode])]


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


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("worlds", [(2, 1), (2, 3), (3, 2, 1), (1, 4)])
def test_a_change_of_worker_count_mid_epoch_still_uses_every_example_once(tmp_path, worlds, mode):
    """Workers read part of an epoch, the run resumes with another number of workers (and possibly again, from
    a re-dealt share), and the new workers finish the epoch: together they used every example of the shards once,
    and from the next epoch on each worker reads its own files again. Positions inside a window re-deal the
    window's unused examples."""
    sizes, batching = [10, 7, 12, 5, 9, 3, 8, 11], MODES[mode]
    files = _objective_files(tmp_path, sizes, mode)
    everything = sorted((f, r) for f, n in enumerate(sizes) for r in range(n))
    used = []
    positions = [StreamPosition()] * worlds[0]
    for old, new in zip(worlds, worlds[1:]):
        for rank in range(old):  # as in training: every worker takes the same number of micro-batches
            for batch, positions[rank] in _stream(files, positions[rank], 2, batching, rank=rank, world=old):
                assert positions[rank].epoch == 0  # every share is longer than 2 micro-batches: all within epoch 0
                used += _examples(batch)
        positions = [redeal(positions, files, rank, new, batching) for rank in range(new)]
    for rank, position in enumerate(positions):
        used += _rest_of_epoch(files, position, rank, worlds[-1], batching)
    assert sorted(used) == everything
    for rank in range(worlds[-1]):
        [(batch, after)] = _stream(files, StreamPosition(1), 1, batching, rank=rank, world=worlds[-1])
        assert after.dealt is None and {f % worlds[-1] for f, _ in _examples(batch)} == {rank}


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
