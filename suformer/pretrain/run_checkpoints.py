"""A pretraining run's checkpoints: writing, checking, pruning and resuming, also with another number of workers.

Every `checkpoint_every` steps each rank saves its DeepSpeed shard plus its data position and RNG state into a
local directory and reports it; Ray Train merges the ranks' files into one checkpoint folder of the run. Each
rank also writes, last, a manifest of its files and their sizes. A (re)started worker resumes from the newest
complete folder, whether Ray Train registered it or not (a killed driver may not have); one damaged afterwards
(a truncated copy, a lost file) is recognised from the manifests and the previous complete one is used instead.

A checkpoint written by another number of workers (a node lost and not replaced, a resubmission with fewer or
more) is loaded through a DeepSpeed universal checkpoint, which holds each parameter's weights and optimizer
state whole, so any number of workers can take its slice of them; the rest of the epoch's data is re-dealt
(`batches.redeal`).
"""
from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..storage import Location
from .batches import Batching, StreamPosition, redeal

CHECKPOINT_TAG = "state"


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_manifest(directory: Path, rank: int) -> None:
    """Record this rank's files and sizes; written last, so its presence means the rank's part was written."""
    files = {str(p.relative_to(directory)): p.stat().st_size for p in directory.rglob("*") if p.is_file()}
    (directory / f"manifest_rank{rank}.json").write_text(json.dumps(files))


def save_checkpoint(engine, directory: Path, rank: int, position: StreamPosition, train_state: dict) -> None:
    """This rank's part of a checkpoint into a local `directory`; rank 0 adds the run's `train_state`."""
    engine.save_checkpoint(directory, tag=CHECKPOINT_TAG)
    (directory / f"position_rank{rank}.json").write_text(json.dumps(position.__dict__))
    torch.save(_rng_state(), directory / f"rng_rank{rank}.pt")
    if rank == 0:
        (directory / "train_state.json").write_text(json.dumps(train_state))
    write_manifest(directory, rank)


def _read_json(directory: Location, name: str, present: dict[str, int]) -> dict | str:
    """A checkpoint's JSON file, or why it cannot be read. Another rank's part of the newest checkpoint may still
    be on its way into the folder when rank 0 looks (it prunes right after its own report), so an empty or cut
    file is a checkpoint that is not complete yet, not an error."""
    try:
        if name in present:
            return json.loads((directory / name).read_text())
    except FileNotFoundError:
        pass  # deleted since the listing
    except ValueError:  # UnicodeDecodeError is a ValueError too
        return f"{name} is incomplete"
    return f"{name} is missing"


def checkpoint_problem(directory) -> str | None:
    """Why a checkpoint folder (a local path or URI) cannot be resumed from (a missing or truncated file), or None
    if it is complete. One listing gives every file's size, so a checkpoint on object storage costs one request
    plus the JSON files."""
    directory = Location.of(directory)
    present = directory.files()
    state = _read_json(directory, "train_state.json", present)
    if isinstance(state, str):
        return state
    for rank in range(state["world_size"]):
        files = _read_json(directory, f"manifest_rank{rank}.json", present)
        if isinstance(files, str):
            return files
        for name, size in files.items():
            if name not in present:
                return f"{name} is missing"
            if present[name] != size:
                return f"{name} has {present[name]} bytes, {size} were written"
    return None


def checkpoints_newest_first(run_storage: Location) -> list[Location]:
    """Every checkpoint folder the run has written, newest first, whether Ray Train registered it or not: a job
    driver killed between the workers writing a checkpoint and Ray Train's controller recording it (it polls the
    workers) leaves that checkpoint in storage but not in Ray Train's snapshot, and a resubmission would start
    over."""
    return [f for f in reversed(run_storage.folders()) if f.name.startswith("step-")]


def prune_unregistered_checkpoints(run_storage, keep: int) -> list[Location]:
    """Delete the checkpoint folders Ray Train will never know of (left by a killed driver) that `keep` newer
    complete folders make useless; returns them. The ones Ray Train registered it prunes itself, and must be left
    to: it fails on a registered folder that is gone. Ray Train registers reports in order and names each folder
    in its checkpoint-manager snapshot, so an unnamed folder older than a named one will never be registered;
    newer ones may still be on their way and stay. `run_storage`: a local path or URI."""
    run_storage = Location.of(run_storage)
    snapshot = run_storage / "checkpoint_manager_snapshot.json"
    registered = set(re.findall(r"step-\d{8}", snapshot.read_text())) if snapshot.is_file() else set()
    folders = checkpoints_newest_first(run_storage)
    kept = [d for d in folders if checkpoint_problem(d) is None][:keep]
    if not registered or len(kept) < keep:
        return []
    oldest_kept, newest_registered = kept[-1].name, max(registered)
    pruned = [d for d in folders if d.name not in registered and d.name < min(oldest_kept, newest_registered)]
    for folder in pruned:
        folder.delete()
    return pruned


@dataclass
class Resume:
    """The checkpoint a (re)started worker continues from."""
    directory: Location
    state: dict  # train_state.json: step, world_size, ...
    skipped: list[str]  # newer checkpoints found damaged, with why
    world: int  # the resuming run's number of workers

    @property
    def tags(self) -> dict[str, str]:
        """Where this attempt started, for the MLflow run."""
        tags = {"suformer.resumed_from": self.directory.name}
        if self.skipped:
            tags["suformer.skipped_checkpoints"] = "; ".join(self.skipped)
        if self.state["world_size"] != self.world:
            tags["suformer.resharded"] = f"{self.state['world_size']} -> {self.world} workers"
        return tags

    @cached_property
    def needs_universal(self) -> bool:
        """Whether loading needs a universal checkpoint: the world size changed and the optimizer state (ZeRO,
        or DeepSpeed's bf16 optimizer) is partitioned by rank. Unpartitioned state loads at any world size."""
        return (self.state["world_size"] != self.world
                and any("zero_pp_rank_" in name for name in self.directory.files()))


def newest_complete(checkpoints: list[Location], world: int) -> Resume:
    """The newest complete checkpoint of `checkpoints` (newest first), skipping damaged ones."""
    skipped = []
    for directory in checkpoints:
        problem = checkpoint_problem(directory)
        if problem is None:
            return Resume(directory, json.loads((directory / "train_state.json").read_text()), skipped, world)
        skipped.append(f"{directory.name} ({problem})")
    raise RuntimeError(f"no complete checkpoint to resume from: {'; '.join(skipped)}")


def _this_ranks_part(rank: int):
    """Which of a checkpoint's files rank `rank` needs: all but the other ranks' ZeRO partitions."""
    def wanted(name: str) -> bool:
        found = re.search(r"zero_pp_rank_(\d+)_", name)
        return found is None or int(found.group(1)) == rank
    return wanted


def to_universal(checkpoint: Path, out: Path, workers: int) -> None:
    """DeepSpeed's `ds_to_universal` of a local checkpoint folder into `out`, in a child process (it starts its
    own worker pool and prints progress bars). `--inject_missing_state`: a plain (non-Megatron) engine does not
    record the universal-checkpoint version the converter asks for."""
    done = subprocess.run(
        [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
         str(checkpoint / CHECKPOINT_TAG), "--output_folder", str(out / CHECKPOINT_TAG), "--num_extract_workers",
         str(max(1, workers)), "--num_merge_workers", "1", "--inject_missing_state"],
        capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"converting {checkpoint} to a universal checkpoint failed:\n{done.stderr[-3000:]}")


def _load_universal(engine, resume: Resume, local_rank: int, convert_workers: int) -> None:
    """Each node's first worker converts the checkpoint once, into a node-local folder all its workers load."""
    universal = Path(tempfile.gettempdir()) / f"suformer-universal-{resume.state['run_id']}-{resume.directory.name}"
    if local_rank == 0:
        shutil.rmtree(universal, ignore_errors=True)
        with tempfile.TemporaryDirectory() as tmp:
            directory = resume.directory
            to_universal(Path(directory.path) if directory.is_local else directory.download(tmp), universal,
                         convert_workers)
    dist.barrier()  # the node's universal checkpoint is complete
    engine.load_checkpoint(universal, tag=CHECKPOINT_TAG)
    dist.barrier()  # and every worker of the node has read it
    if local_rank == 0:
        shutil.rmtree(universal, ignore_errors=True)


def _positions_and_rngs(name: str) -> bool:
    return name.startswith(("position_rank", "rng_rank"))


def restore(engine, resume: Resume, rank: int, local_rank: int, shards: list[str], fs, batching: Batching,
            convert_workers: int = 1) -> StreamPosition:
    """Load `resume` into the engine and this rank's RNGs; returns the data position. A checkpoint on object
    storage is first copied to a local temp folder, this rank's part only."""
    directory, old_world, universal = resume.directory, resume.state["world_size"], resume.needs_universal
    if universal:
        _load_universal(engine, resume, local_rank, convert_workers)
    with tempfile.TemporaryDirectory() as tmp:
        wanted = _positions_and_rngs if universal else _this_ranks_part(rank)
        local = Path(directory.path) if directory.is_local else directory.download(tmp, wanted)
        if not universal:
            engine.load_checkpoint(local, tag=CHECKPOINT_TAG)
        if (local / f"rng_rank{rank}.pt").is_file():  # not for a worker added since: it keeps its seeded RNGs
            _set_rng_state(torch.load(local / f"rng_rank{rank}.pt", weights_only=False))
        def saved(r: int) -> StreamPosition:  # where old rank r stood in its files
            return StreamPosition.saved(json.loads((local / f"position_rank{r}.json").read_text()),
                                        shards[r::old_world], fs)

        if old_world == resume.world:
            return saved(rank)
        return redeal([saved(r) for r in range(old_world)], shards, rank, resume.world, batching, fs)
