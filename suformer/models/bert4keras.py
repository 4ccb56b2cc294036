"""The checkpoints Su released, as published: bert4keras TensorFlow directories (`chinese_t5_pegasus_{small,base}`:
`model.ckpt` + `config.json` + `vocab.txt`; `chinese_roformer-v2-char_*`: `bert_model.ckpt` + `bert_config.json` +
`vocab.txt`), mapped onto the transformers-layout checkpoint names (spec: models.md §4.1 and §2.9), which the
family's key templates then map onto the model's own, as for any other checkpoint.

TensorFlow kernels are [in, out] and become `nn.Linear.weight = kernel.T`; the T5 relative-bias tables are
[heads, buckets] and become `nn.Embedding(buckets, heads)`. T5 PEGASUS is then read with the bert4keras semantics
it was trained with (erf GELU, the cross-attention bias, the decoder output times d_model**-0.5 before the untied
head), which is `compat="bert4keras"`, the default of `from_pretrained`.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch

from .tf_checkpoint import TFCheckpoint, find_checkpoint

# Variables a training checkpoint may hold besides the weights (optimizer slots, step and loss-scale counters).
_NOT_WEIGHTS = re.compile(r"(^|/)(global_step|bad_steps|good_steps|loss_scale)$|/(adam_[mv]|Adam(_\d+)?)$|_slot_")
CONFIG_FILES = ("config.json", "bert_config.json")


def is_bert4keras_dir(folder) -> bool:
    """A release directory: a TensorFlow checkpoint and a bert4keras config, no PyTorch weights."""
    folder = Path(folder)
    return any((folder / name).is_file() for name in CONFIG_FILES) and find_checkpoint(folder) is not None


def read_bert4keras(folder) -> tuple[str, dict, dict[str, torch.Tensor]]:
    """(family, a config.json in our layout's terms, the state dict in the transformers layout's names)."""
    folder = Path(folder)
    checkpoint = TFCheckpoint(find_checkpoint(folder))
    config_file = next(folder / name for name in CONFIG_FILES if (folder / name).is_file())
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_file}: not valid JSON ({e})") from None
    names = [n for n in checkpoint.names() if not _NOT_WEIGHTS.search(n)]
    if "shared/embedding" in names:
        family, mapping, cfg = "t5_pegasus", _t5_mapping(names), _t5_config(config, config_file)
    elif "bert/embeddings/word_embeddings" in names:
        family, mapping, cfg = "roformer_v2", _roformer_mapping(names), _roformer_config(config, config_file)
    else:
        raise ValueError(f"{checkpoint.index_file}: neither a T5 (shared/embedding) nor a BERT-layout "
                         f"(bert/embeddings/word_embeddings) checkpoint; its first variables: {names[:5]}")
    unmapped = sorted(set(names) - set(mapping))
    if unmapped:
        hint = " (LayerNorm gains/biases: a RoFormer v1 or BERT checkpoint, not RoFormerV2)" if family == \
            "roformer_v2" and any(re.search(r"(gamma|beta|bias)$", n) for n in unmapped) else ""
        raise ValueError(f"{checkpoint.index_file}: variables the {family} layout does not have{hint}: "
                         f"{', '.join(unmapped[:10])}")
    state = {}
    for name, (key, transpose) in mapping.items():
        array = checkpoint.read(name).astype(np.float32)
        state[key] = torch.from_numpy(np.ascontiguousarray(array.T if transpose else array))
    return family, cfg, state


def _t5_mapping(names: list[str]) -> dict[str, tuple[str, bool]]:
    """TF name -> (transformers MT5 key, transpose); the norm may be named rms_norm (mt5.1.1, T5 PEGASUS) or
    layer_norm / final_layer_norm (bert4keras >= 0.11 t5.1.1)."""
    mapping = {"shared/embedding": ("shared.weight", False), "decoder/logits/kernel": ("lm_head.weight", True)}
    sublayers = {"encoder": ("SelfAttention", "DenseReluDense"),
                 "decoder": ("SelfAttention", "EncDecAttention", "DenseReluDense")}
    for name in names:
        parts = name.split("/")
        if name.endswith("relative_attention_bias"):
            mapping[name] = (f"{parts[0]}.block.0.layer.0.SelfAttention.relative_attention_bias.weight", True)
        elif parts[-1] == "scale" and len(parts) == 3:  # encoder/rms_norm/scale
            mapping[name] = (f"{parts[0]}.final_layer_norm.weight", False)
        elif parts[-1] == "scale" and len(parts) == 5:  # encoder/block_003/layer_001/rms_norm/scale
            mapping[name] = (f"{parts[0]}.block.{int(parts[1][6:])}.layer.{int(parts[2][6:])}.layer_norm.weight", False)
        elif len(parts) >= 5 and parts[0] in sublayers and parts[1].startswith("block_"):
            block, layer, module = int(parts[1][6:]), int(parts[2][6:]), parts[3]
            if module not in sublayers[parts[0]]:
                continue
            weight = parts[4]  # q/k/v/o, or wi_0/wi_1/wo followed by /kernel
            mapping[name] = (f"{parts[0]}.block.{block}.layer.{layer}.{module}.{weight}.weight", True)
    return {n: mapping[n] for n in names if n in mapping}


def _t5_config(config: dict, where: Path) -> dict:
    if config.get("hidden_act") != ["gelu", "linear"]:
        raise ValueError(f"{where}: hidden_act={config.get('hidden_act')!r}; T5 PEGASUS is T5.1.1 "
                         "(hidden_act [\"gelu\", \"linear\"], a gated-GELU FFN)")
    try:
        heads = config["num_attention_heads"]
        return {
            "model_type": "mt5", "vocab_size": config["vocab_size"], "d_model": config["hidden_size"],
            "num_heads": heads, "d_kv": config.get("attention_head_size", config["hidden_size"] // heads),
            "d_ff": config["intermediate_size"], "num_layers": config["num_hidden_layers"],
            "relative_attention_num_buckets": config.get("relative_attention_num_buckets", 32),
            "dropout_rate": config.get("hidden_dropout_prob", 0.1), "feed_forward_proj": "gated-gelu",
        }
    except KeyError as e:
        raise ValueError(f"{where}: missing field {e.args[0]!r}") from None


def _roformer_mapping(names: list[str]) -> dict[str, tuple[str, bool]]:
    mapping = {}
    for name in names:
        if name in ("bert/embeddings/word_embeddings", "bert/embeddings/token_type_embeddings"):
            mapping[name] = ("roformer.embeddings." + name.split("/")[-1] + ".weight", False)
        elif name.startswith("bert/encoder/layer_") and name.endswith("/kernel"):
            parts = name.split("/")  # bert/encoder/layer_3/attention/self/query/kernel
            mapping[name] = (f"roformer.encoder.layer.{int(parts[2][6:])}." + ".".join(parts[3:-1]) + ".weight", True)
    return mapping


def _roformer_config(config: dict, where: Path) -> dict:
    if config.get("hidden_act", "relu") != "relu":
        raise ValueError(f"{where}: hidden_act={config['hidden_act']!r}; RoFormerV2 uses relu")
    return {**config, "model_type": "roformer", "use_bias": False, "norm_type": "rms_norm"}
