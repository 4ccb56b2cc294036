"""Fine-tuning tricks inside a DeepSpeed engine (train.zero_stage): the same run as plain PyTorch, or refused.

Each case trains one epoch twice from the same seed, once plain and once under ZeRO, and compares the final
weights: ZeRO only moves where gradients and optimizer state live, so the result must not change (FGM and PGD
switch to their one-backward form under the engine, which reorders float sums: hence the tolerance)."""
import pytest
import torch

from suformer.config import ConfigError, FinetuneConfig, load_config
from suformer.finetune.loop import finetune


def run(tmp_path, tricks: dict, zero, task="sentiment", precision="auto", **train):
    cfg = FinetuneConfig.model_validate({
        "model": {"family": "t5_pegasus" if task == "idiom" else "roformer_v2", "dropout": 0.0},
        "data": {"task": task, "max_train_examples": 96, "max_eval_examples": 16, "max_len": 32},
        "tricks": tricks, "train": {"epochs": 1, "batch_size": 32, "lr": 1e-3, "threads": 2, "zero_stage": zero,
                  "precision": precision, **train},
        "run": {"root": str(tmp_path)}})
    out = finetune(cfg)
    return out["metrics"]["train/loss"], out["model"].state_dict()


@pytest.mark.parametrize("tricks, stage, task", [
    ({"adversarial": "fgm", "adversarial_epsilon": 0.1}, 2, "sentiment"),
    ({"adversarial": "pgd", "adversarial_epsilon": 0.1}, 1, "sentiment"),
    ({"adversarial": "gradient_penalty", "adversarial_epsilon": 0.5, "ema_decay": 0.9}, 2, "sentiment"),
    ({"lora_r": 4, "layerwise_lr_decay": 0.8}, 2, "sentiment"),
    ({"child_tuning": "D"}, 0, "sentiment"),
    ({"ladder_side_layers": 2}, 1, "sentiment"),
    ({"prompt_tuning_tokens": 4}, 2, "sentiment"),
    ({"exposure_bias_replace": 0.3}, 2, "idiom"),
], ids=["fgm-zero2", "pgd-zero1", "gradient_penalty+ema-zero2", "lora+layerwise-zero2", "child_tuning_d-zero0", "ladder_side-zero1", "prompt_tuning-zero2",
        "t5_exposure_bias-zero2"])
def test_tricks_under_zero_train_the_same_weights_as_plain_pytorch(tmp_path, tricks, stage, task):
    plain_loss, plain = run(tmp_path, tricks, None, task)
    zero_loss, zero = run(tmp_path, tricks, stage, task)
    assert zero_loss == pytest.approx(plain_loss, rel=1e-5)
    assert plain.keys() == zero.keys()
    for key, value in plain.items():
        torch.testing.assert_close(zero[key], value, rtol=1e-4, atol=5e-5, msg=key)


@pytest.mark.parametrize("overrides, message", [
    (["train.zero_stage=3"], "train.zero_stage: Input should be 0, 1 or 2"),
    (["train.zero_stage=1", "tricks.child_tuning=F"], "ZeRO-1 has already reduced them into its partitions"),
    (["train.zero_stage=0", "tricks.ptuning=prompt", "tricks.adversarial=fgm"], "P-tuning's tied MLM decoder"),
    (["train.offload_optimizer=true"], "train.offload_optimizer needs train.zero_stage 1 or 2"),
    (["train.precision=bf16"], "train.precision bf16 is the DeepSpeed engine's: set train.zero_stage"),
])
def test_combinations_zero_cannot_run_are_refused_naming_the_keys(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides, schema=FinetuneConfig)


def test_bf16_precision_trains_in_bf16_inside_the_engine_and_close_to_fp32(tmp_path):
    """train.precision as in pretraining (auto: bf16 on a GPU); asked for explicitly it runs on CPU too."""
    fp32_loss, fp32 = run(tmp_path, {}, 2)
    bf16_loss, bf16 = run(tmp_path, {}, 2, precision="bf16")
    assert {v.dtype for k, v in bf16.items() if v.is_floating_point()} == {torch.bfloat16}
    assert {v.dtype for k, v in fp32.items() if v.is_floating_point()} == {torch.float32}
    assert bf16_loss == pytest.approx(fp32_loss, rel=2e-2)  # bf16 keeps 8 bits of mantissa


@pytest.mark.slow
@pytest.mark.parametrize("task", ["sentiment", "idiom"])
def test_activation_checkpointing_and_compiled_layers_train_the_same_weights(tmp_path, task):
    """Both switches together, inside ZeRO-2, against plain PyTorch without them: the same weights."""
    plain_loss, plain = run(tmp_path, {}, None, task)
    loss, levers = run(tmp_path, {}, 2, task, activation_checkpointing="full", compile=True)
    assert loss == pytest.approx(plain_loss, rel=1e-5)
    for key, value in plain.items():
        torch.testing.assert_close(levers[key], value, rtol=1e-4, atol=5e-5, msg=key)
