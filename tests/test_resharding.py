"""A ZeRO checkpoint written by two workers, resumed by one: real DeepSpeed engines in a gloo process group.

The state after the resume (through `run_checkpoints.restore` and DeepSpeed's universal checkpoint) must equal,
parameter by parameter, the full state the two writers had: fp32 weights and both Adam moments, gathered with
DeepSpeed's own accessors; for AdamW and for AdamWScale (train.optimizer), over the pretraining loop's parameter
groups. The data positions are re-dealt (tests/test_train_loop.py checks that reading).
"""
import json
import os
import shutil
import socket

import pytest
import torch
import torch.multiprocessing as mp

from suformer.pretrain.batches import Batching, StreamPosition

# Run in the session-services group (tests/conftest.py), never beside the cluster's Ray workers: one run beside them
# (a fresh clone on 2 cores, 2026-12-02) aborted in a rank's gloo thread ("terminate called without an active
# exception") during the ZeRO-1 steps, a failure not understood yet; in the group it runs as it always passed.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("session-services")]
SHARDS = [f"shard-{i}.parquet" for i in range(6)]  # names only: positions index them, nothing reads them here


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _full_state(engine) -> dict[str, torch.Tensor]:
    """Every parameter's fp32 weights and Adam moments, whole, whichever ZeRO stage partitions them."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if hasattr(engine.optimizer, "_hp_optimizer_states_linked"):
        # ZeRO 1-2 link each parameter to its optimizer state after the first group's first step, for every group
        # at once, so groups stepped later have no state to link (DeepSpeed 0.19.8): link again, now that all have.
        # Saving and the universal checkpoint do not use these links; only this accessor does.
        engine.optimizer._hp_optimizer_states_linked = False
        engine.optimizer._lazy_init_hp_params_optimizer_state()
    state = {}
    for name, p in engine.module.named_parameters():
        state[name] = safe_get_full_fp32_param(p).clone()
        for moment in ("exp_avg", "exp_avg_sq"):
            state[f"{name}/{moment}"] = safe_get_full_optimizer_state(p, moment).clone()
    return state


def _worker(rank, world, port, stage, optimizer, folder, phase):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    import deepspeed

    from suformer.models import build_model
    from suformer.storage import Location
    from suformer.train.jit_ops import load_deepspeed_ops, ops_for
    from suformer.train.optimizers import optimizer_named, parameter_groups
    from suformer.pretrain.run_checkpoints import newest_complete, restore, save_checkpoint

    torch.manual_seed(0)
    model = build_model("t5_pegasus", "tiny", vocab_size=300, dropout=0.0)
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "train_batch_size": 2 * world,
              "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    resume = newest_complete([Location.of(folder / "step-00000002")], world) if phase == "load" else None
    if resume and resume.needs_universal:
        config["checkpoint"] = {"load_universal": True}
    load_deepspeed_ops(ops_for(use_gpu=False))  # as a training worker does
    deepspeed.init_distributed(dist_backend="gloo")
    groups = parameter_groups(model, optimizer, lr=1e-2, weight_decay=0.01, eps=1e-6)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer_named(optimizer, groups, partitioned=True),
                                      config=config)
    if phase == "save":
        ids = torch.Generator().manual_seed(rank)
        for _ in range(2):
            batch = torch.randint(3, 300, (2, 9), generator=ids)
            engine.backward(engine(input_ids=batch, decoder_input_ids=batch, labels=batch).loss)
            engine.step()
        # Each rank writes its part into a folder of its own, merged into one checkpoint, as Ray Train does.
        save_checkpoint(engine, folder / f"rank{rank}", rank, StreamPosition(0, 1, 5),
                        {"step": 2, "run_id": "test", "world_size": world})
        torch.distributed.barrier()
        shutil.copytree(folder / f"rank{rank}", folder / "step-00000002", dirs_exist_ok=True)
    else:
        position = restore(engine, resume, rank, rank, SHARDS, None, Batching("pegasus", "grouped", 2))
        (folder / f"position-after-{rank}.json").write_text(json.dumps(position.__dict__))
    state = _full_state(engine)  # gathering is collective under ZeRO-3: every rank calls it
    if rank == 0:
        torch.save(state, folder / f"{phase}.pt")


@pytest.mark.parametrize("stage, optimizer", [(1, "adamw_scale"), (3, "adamw")])
def test_a_zero_checkpoint_of_two_workers_resumes_on_one_with_the_same_weights_and_optimizer_state(tmp_path, stage,
                                                                                                   optimizer):
    mp.spawn(_worker, args=(2, _free_port(), stage, optimizer, tmp_path, "save"), nprocs=2)
    mp.spawn(_worker, args=(1, _free_port(), stage, optimizer, tmp_path, "load"), nprocs=1)
    saved, loaded = torch.load(tmp_path / "save.pt"), torch.load(tmp_path / "load.pt")
    assert sorted(saved) == sorted(loaded)
    assert any(name.endswith("/exp_avg") and value.abs().sum() > 0 for name, value in saved.items())
    for name, value in saved.items():
        assert torch.equal(value, loaded[name]), name
    # The one worker left reads the rest of both workers' epoch: their files from where each stopped.
    assert json.loads((tmp_path / "position-after-0.json").read_text()) == {
        "epoch": 0, "file": 0, "row": 0, "dealt": [[2, 5], [3, 5], [4, 0], [5, 0]], "done": 0}
