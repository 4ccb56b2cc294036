"""Bad configs stop before anything starts, naming the key, with exit status 2."""
import importlib.util
from pathlib import Path

import pytest

from suformer.config import load_config
from suformer.train.engine import deepspeed_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (REPO / "jobs" / "configs").glob("*.yaml") if not p.stem.startswith(("sweep_", "finetune_")))


def pretrain_main():
    spec = importlib.util.spec_from_file_location("pretrain_job", REPO / "jobs" / "pretrain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_configs_validate_and_give_concrete_deepspeed_json(path):
    cfg = load_config(str(path))
    ds = deepspeed_config(cfg.train.engine_settings())
    assert "auto" not in str(ds)
    t = cfg.train
    assert ds["train_batch_size"] == t.micro_batch_size * t.grad_accum * t.num_workers
    assert ds["bf16"]["enabled"] == t.use_gpu  # bf16 on GPU, fp32 on CPU


@pytest.mark.parametrize(
    "yaml_text, overrides, message",
    [
        ("model: {family: t5_pegasus}\ntrain: {max_stepz: 3}\n", [], r"train\.max_stepz: unknown key"),
        ("model: {family: t5_pegasus}\n", ["train.micro_batch_size=abc"], r"train\.micro_batch_size: Input should be a valid integer"),
        ("model: {family: t5_pegasus}\n", ["train.lr=-1"], r"train\.lr: Input should be greater than 0"),
        ("model: {family: t5_pegasus, preset: huge}\n", [], r"preset 'huge' is not one of"),
        ("model: {family: bert}\n", [], r"model\.family: Input should be 't5_pegasus' or 'roformer_v2'"),
        ("model: {family: t5_pegasus}\ndata: {objective: mlm}\n", [], r"data\.objective 'mlm' does not train t5_pegasus"),
        ("model: {family: t5_pegasus}\ntrain: {max_tokens_per_batch: 100}\n", [],
         r"max_tokens_per_batch 100 cannot hold one example of the maximum length 384"),
        ("model: {family: t5_pegasus}\ntrain: {zero_stage: 1, offload_params: true}\n", [], r"offload_params needs zero_stage 3"),
        ("model: {family: t5_pegasus}\ntrain: {zero_stage: 3, compile: true}\n", [], r"compile with zero_stage 3"),
        ("model: {family: t5_pegasus}\n", ["train.batching=packed"],
         r"train\.batching=packed: data\.objective 'pegasus' cannot be packed"),
        ("model: {family: roformer_v2}\ndata: {objective: mlm}\n", ["train.activation_checkpointing=some"],
         r"train\.activation_checkpointing: Input should be 'none', 'full' or 'selective'"),
        ("model: {family: t5_pegasus}\ndata: {validation_examples: 0}\n", ["train.export_checkpoint=best"],
         r"export_checkpoint=best picks by validation loss: it needs data\.validation_examples > 0"),
        ("model: {family: t5_pegasus}\n", ["train.optimizer=lamb"],
         r"train\.optimizer: Input should be 'adamw', 'adamw_scale' or 'adafactor'"),
        ("model: {family: t5_pegasus\n", [], r"not valid YAML"),
        ("- just\n- a list\n", [], r"top level must be a mapping"),
        ("model: {family: t5_pegasus}\ndata: {corpus: /nonexistent/*.jsonl}\n", [], r"data\.corpus: '/nonexistent/\*\.jsonl' matches no file"),
        ("model: {family: t5_pegasus}\n", ["train.max_steps"], r"expected key=value"),
    ],
)
def test_bad_config_exits_2_naming_the_key(tmp_path, capsys, yaml_text, overrides, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    argv = ["--config", str(path)] + [a for o in overrides for a in ("--set", o)]
    assert pretrain_main()(argv) == 2
    import re

    err = capsys.readouterr().err
    assert re.search(message, err), err


def test_missing_config_file_exits_2(capsys):
    assert pretrain_main()(["--config", "/nonexistent.yaml"]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_empty_corpus_file_is_named(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    path = tmp_path / "c.yaml"
    path.write_text(f"model: {{family: t5_pegasus}}\ndata: {{corpus: '{empty}'}}\n")
    assert pretrain_main()(["--config", str(path)]) == 2
    assert f"{empty}: empty file" in capsys.readouterr().err
