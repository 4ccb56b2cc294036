"""Typed job configs (pretraining, fine-tuning, sweeps): one YAML (+ `--set key=value` overrides) validated before
anything starts.

Everything else is derived from it: the Ray ScalingConfig/RunConfig, the DeepSpeed JSON, the data shards, the
fine-tuning tasks and tricks it selects, the Tune search space.
Errors name the offending key (`train.micro_batch_size: ...`) and jobs exit with status 2.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator,
                      model_validator)
from pydantic_core import PydanticCustomError

from .storage import Location
from .finetune.tricks import TRICKS, settings_fields
from .train.engine import EngineSettings


class ConfigError(ValueError):
    """A config that cannot run; the message names the file and key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _registered_family(name: str) -> str:
    """A model family registered in suformer.models (a Literal of them, read from the registry)."""
    from .models import FAMILIES

    if name not in FAMILIES:
        names = [repr(family) for family in FAMILIES]
        expected = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"  # pydantic's wording
        raise PydanticCustomError("literal_error", "Input should be {expected}", {"expected": expected})
    return name


class ModelSection(_Strict):
    family: str
    preset: str = "tiny"
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    attention_backend: Optional[str] = None  # None: the model default "auto" (Triton kernels on CUDA, SDPA elsewhere)
    compat: Literal["bert4keras", "hf"] = "bert4keras"  # T5 only
    init_from: Optional[str] = None  # a save_pretrained directory to continue from

    check_family = field_validator("family")(_registered_family)

    def config_overrides(self) -> dict[str, Any]:
        """The settings of this section that the family's model config declares (dropout, attention_backend, and
        T5's compat), unset ones left out: what build_model and from_pretrained are given."""
        from .models import FAMILIES

        declared = {f.name for f in dataclasses.fields(FAMILIES[self.family].config_cls) if f.init}
        return {key: value for key, value in self.model_dump().items() if key in declared and value is not None}

    @model_validator(mode="after")
    def _preset_exists(self):
        from .models import FAMILIES

        presets = FAMILIES[self.family].presets
        if self.preset not in presets:
            raise ValueError(f"preset {self.preset!r} is not one of {sorted(presets)} for {self.family}")
        return self


class DataSection(_Strict):
    # "peoples_daily" (bundled), or comma-separated files, directories and globs of .txt, .jsonl and .parquet
    # (text files may be compressed: .txt.gz, .jsonl.zst, ...)
    corpus: str = "peoples_daily"
    # .txt documents: "blank_line" = one sentence per line, a blank line between documents (BERT's convention);
    # "line" = one document per line
    txt_documents: Literal["blank_line", "line"] = "blank_line"
    text_key: str = "text"  # the .jsonl field / .parquet column holding the text
    encoding: Optional[str] = None  # of .txt and .jsonl files: None = UTF-8 (a byte-order mark is accepted)
    max_documents: Optional[int] = Field(None, gt=0)  # documents read (skipped ones included), in corpus order
    # Longer lines (a runaway line, a binary file read as text) are skipped and counted, not trained on; longer
    # blank-line documents are cut at a line boundary.
    max_document_chars: int = Field(1_000_000, gt=0)
    objective: str = "pegasus"  # a pretraining objective of suformer.pretrain.data.objectives: pegasus, mlm, unilm
    vocab: Optional[str] = None  # vocab.txt; None builds one from the corpus
    vocab_size: int = Field(50000, gt=106)
    vocab_sample_mb: float = Field(200.0, gt=0)  # text counted for a built vocab: a seeded sample of the corpus
    # PEGASUS (T5 PEGASUS train.py defaults)
    unit_chars: int = Field(32, gt=0)
    chunk_chars: int = Field(768, gt=0)
    min_units: int = Field(3, ge=2)
    summary_rate: float = Field(0.25, gt=0.0, lt=1.0)
    max_source_len: int = Field(384, ge=8)
    max_target_len: int = Field(128, ge=4)
    # MLM / UniLM (RoFormerV2)
    max_len: int = Field(512, ge=8)
    mask_rate: float = Field(0.15, gt=0.0, lt=1.0)
    rows_per_shard: int = Field(2000, gt=0)
    # Held out for val/loss, never trained on: the fewest last shard files holding this many examples (0: no
    # validation). How the shards are read, not how they are made: not part of their fingerprint.
    validation_examples: int = Field(1000, ge=0)
    seed: int = 0


class EfficiencySettings(_Strict):
    """The switches both halves' train sections share (suformer/train/efficiency.py)."""

    # Recompute activations in the backward pass instead of keeping them: every layer ("full"), every
    # activation_checkpointing_every-th layer of each stack from the first ("selective"), or none. About a third
    # more compute for the memory; gradients unchanged.
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    activation_checkpointing_every: int = Field(2, ge=1)
    compile: bool = False  # torch.compile each layer (compiled at its first call, the time printed once)


class TrainSection(EfficiencySettings):
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    # Ray placement of the workers: PACK fills a node first; SPREAD puts them on different nodes where it can, and
    # a restart after a lost node packs them onto what is left.
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    micro_batch_size: int = Field(8, ge=1)
    max_tokens_per_batch: Optional[int] = Field(None, gt=0)  # token budget: fewer rows for long batches
    # How a worker's examples become micro-batches, from a window of batching_window x micro_batch_size examples
    # read in order: "packed" fills rows of the objective's maximum length with whole examples, each attending
    # only to itself (RoFormerV2's objectives); "grouped" sorts the window by length and cuts it into micro-batches
    # of similar lengths; both then shuffle the window's micro-batches. "sequential": in order, padded to the
    # longest. "auto": the objective's choice (mlm packed; pegasus and unilm grouped).
    batching: Literal["auto", "packed", "grouped", "sequential"] = "auto"
    batching_window: int = Field(64, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_steps: int = Field(100, ge=1)
    # adamw; adamw_scale: AdamW whose step is scaled by each weight's RMS (nanoT5); adafactor: unfactored, relative
    # steps (T5). The scaled ones take a relative lr, about 1e-2 (train/optimizers.py).
    optimizer: Literal["adamw", "adamw_scale", "adafactor"] = "adamw"
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    adam_eps: float = Field(1e-6, gt=0)  # bert4keras Adam; adamw_scale's too
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    grad_clip: float = Field(1.0, ge=0)
    # A NaN/inf loss on any rank: "skip" drops that micro-batch on every rank (no update, counted as
    # train/nonfinite_skipped) and stops once more than max_nonfinite_skips were dropped; "stop" stops at the first.
    # Stopping writes no checkpoint, so the latest one is the last good state.
    nonfinite_loss: Literal["skip", "stop"] = "skip"
    max_nonfinite_skips: int = Field(20, ge=0)
    seed: int = 0
    log_every: int = Field(10, ge=1)
    checkpoint_every: int = Field(50, ge=1)
    eval_every: Optional[int] = Field(None, ge=1)  # steps between validations; None: at every checkpoint
    keep_checkpoints: int = Field(2, ge=1)
    # The checkpoint exported as the run's model: the last, or the one with the lowest validation loss (validation
    # then also runs at every checkpoint, and the kept checkpoints are the best ones plus the latest).
    export_checkpoint: Literal["last", "best"] = "last"
    max_failures: int = Field(3, ge=-1)
    samples_to_log: int = Field(4, ge=0)

    @model_validator(mode="after")
    def _consistent(self):
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("offload_params needs zero_stage 3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage >= 1")
        if self.compile and self.zero_stage == 3:
            raise ValueError("compile with zero_stage 3: ZeRO-3 gathers each layer's parameters in hooks that a "
                             "compiled layer recompiles past torch's limit, then runs eagerly; compile with "
                             "zero_stage 0-2, or leave compile off")
        return self

    def engine_settings(self) -> EngineSettings:
        return EngineSettings(
            micro_batch_size=self.micro_batch_size, grad_accum=self.grad_accum, world_size=self.num_workers,
            grad_clip=self.grad_clip, zero_stage=self.zero_stage, precision=self.precision, on_gpu=self.use_gpu,
            offload_optimizer=self.offload_optimizer, offload_params=self.offload_params,
            own_optimizer=self.optimizer != "adamw")


class RunSection(_Strict):
    name: str = Field("suformer-pretrain", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    root: str = Field(default_factory=lambda: os.environ.get("SUFORMER_ROOT", str(Path.home() / "suformer_runs")))
    experiment: str = "suformer-pretrain"
    tracking_uri: Optional[str] = None  # None: MLFLOW_TRACKING_URI, else sqlite under `root` (resolved on load)

    @model_validator(mode="after")
    def _resolve_tracking_uri(self):
        """Resolved once, when the config is loaded: a config sent to a Ray worker (whose MLFLOW_TRACKING_URI may
        differ from the driver's) keeps the driver's store."""
        if self.tracking_uri:
            return self
        if os.environ.get("MLFLOW_TRACKING_URI"):
            uri = os.environ["MLFLOW_TRACKING_URI"]
        elif "://" in self.root:
            raise ValueError(f"run.root={self.root!r} is on object storage, where MLflow cannot keep its "
                             "database: set run.tracking_uri (an MLflow server, or sqlite:///<local path>) or "
                             "MLFLOW_TRACKING_URI")
        else:
            uri = f"sqlite:///{Location.of(self.root).path}/mlflow.db"
        self.__dict__["tracking_uri"] = uri  # not through validate_assignment, which would run this again
        return self


# Settings a resubmitted run may change: they do not alter what was trained so far. (The NaN policy among them:
# a run stopped by a non-finite loss can be resubmitted with train.nonfinite_loss=skip to get past it; the shard
# location follows run.root; the number of workers too, e.g. after a node is lost: its checkpoint is loaded as a
# DeepSpeed universal checkpoint, and grad_accum can keep the global batch, micro_batch_size x grad_accum x workers.)
RESUBMIT_MUTABLE = frozenset({
    "train.max_steps", "train.max_failures", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
    "train.samples_to_log", "train.eval_every", "train.nonfinite_loss", "train.max_nonfinite_skips",
    "train.num_workers", "train.grad_accum", "run.root", "run.tracking_uri", "data.shards",
})


class _Job(_Strict):
    """What every job config derives the same way: where its run lives and how MLflow sees it."""

    # -- derived locations --------------------------------------------------------------------------------------
    @property
    def run_dir(self) -> Location:
        return Location.of(self.run.root) / self.run.name

    @property
    def tracking_uri(self) -> str:
        return self.run.tracking_uri

    def flat(self) -> dict[str, Any]:
        """`section.key: value` pairs (MLflow params)."""
        return {f"{s}.{k}": v for s, section in self.model_dump().items() for k, v in section.items()}


class PretrainConfig(_Job):
    model: ModelSection
    data: DataSection = DataSection()
    train: TrainSection = TrainSection()
    run: RunSection = Field(default_factory=RunSection)  # made (and its store resolved) at load

    @model_validator(mode="after")
    def _objective_fits_family(self):
        from .pretrain.data.objectives import OBJECTIVES

        wanted = [name for name, objective in OBJECTIVES.items() if objective.family == self.model.family]
        if self.data.objective not in wanted:
            known = "does not train" if self.data.objective in OBJECTIVES else "is not an objective; it must train"
            raise ValueError(f"data.objective {self.data.objective!r} {known} {self.model.family} "
                             f"(use one of {wanted})")
        if self.train.max_tokens_per_batch is not None:
            longest = OBJECTIVES[self.data.objective].longest(self.data)
            if self.train.max_tokens_per_batch < longest:
                raise ValueError(f"train.max_tokens_per_batch {self.train.max_tokens_per_batch} cannot hold one "
                                 f"example of the maximum length {longest}")
        batching = self.train.batching
        if batching == "packed" and not OBJECTIVES[self.data.objective].packs:
            raise ValueError(f"train.batching=packed: data.objective {self.data.objective!r} cannot be packed (an "
                             "encoder-decoder's cross-attention would see other examples); use grouped")
        if self.train.export_checkpoint == "best" and not self.data.validation_examples:
            raise ValueError("train.export_checkpoint=best picks by validation loss: it needs "
                             "data.validation_examples > 0")
        return self



class FinetuneRunSection(RunSection):
    name: str = Field("suformer-finetune", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    experiment: str = "suformer-finetune"

    @field_validator("root")
    @classmethod
    def _local(cls, root: str) -> str:
        if "://" in root:
            raise ValueError(f"run.root {root!r}: fine-tuning keeps its runs on a local or shared filesystem "
                             "(object storage is for pretraining runs)")
        return root


class FinetuneModelSection(_Strict):
    family: str = "roformer_v2"  # must be the task's (its Task.family)
    preset: str = "tiny"
    init_from: Optional[str] = None  # a save_pretrained model of the family (e.g. a pretraining run's export)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)  # Su uses 0.3 with R-Drop and SimCSE
    pooling: Literal["cls", "mean"] = "cls"

    check_family = field_validator("family")(_registered_family)
    similarity_loss: Literal["cosent", "sbert"] = "cosent"  # similarity task: CoSENT or the Sentence-BERT baseline
    attention_backend: Optional[str] = None


class FinetuneDataSection(_Strict):
    task: str = "sentiment"  # a registered task (suformer/finetune/tasks)
    # similarity: a senteval_cn folder (*.train.data, *.valid.data, *.test.data) or CLUE's AFQMC folder;
    # classification: a CLUE folder (TNEWS, IFLYTEK: train.json, dev.json, labels.json); title: a CSL folder;
    # ner: CLUENER's folder (train.json, dev.json) instead of People's Daily
    path: Optional[str] = None
    split_seed: int = 0
    max_len: int = Field(64, ge=8)
    max_train_examples: Optional[int] = Field(None, gt=0)  # a fixed subsample (CPU runs)
    max_eval_examples: Optional[int] = Field(None, gt=0)
    vocab_size: int = Field(6000, gt=106)  # char vocab from the training texts when model.init_from is unset
    num_beams: int = Field(1, ge=1)  # idiom, title: beam width (bert4keras' beam search)
    max_target_len: int = Field(32, ge=2)  # title: tokens of the target, [CLS] and [SEP] included (Su: 32)

    @field_validator("task")
    @classmethod
    def _registered(cls, task):
        from .finetune.tasks import TASKS

        if task not in TASKS:
            raise ValueError(f"{task!r} is not a task (use one of {sorted(TASKS)})")
        return task


# Every trick off by default; each trick module declares its own keys (`Trick.Settings`), with the defaults each
# paper or post used in its comments (tricks.md).
TricksSection = create_model("TricksSection", __base__=_Strict, __module__=__name__, **settings_fields())


class FinetuneTrainSection(EfficiencySettings):
    epochs: int = Field(3, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(2e-5, gt=0)
    # adafactor: the CLUE recipe of RoFormerV2 (bert4keras' AdaFactor, unfactored, beta1 0.9, steps relative to
    # each weight's RMS), as train/optimizers.py implements it for pretraining.
    optimizer: Literal["adamw", "adafactor"] = "adamw"
    # After the warm-up: linear decay to 0, or constant (Su's fine-tuning scripts: bert4keras' optimizers as built).
    schedule: Literal["linear", "constant"] = "linear"
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    grad_clip: float = Field(1.0, ge=0)
    seed: int = 0
    threads: int = Field(1, ge=1)  # torch intra-op threads per run (one Tune trial per CPU)
    # None: plain PyTorch. 0/1/2: a one-process DeepSpeed engine (ZeRO-1/2 with offload_optimizer keep the optimizer
    # state in CPU memory on a GPU). ZeRO-3 is refused: it partitions the very parameters the tricks read.
    zero_stage: Optional[Literal[0, 1, 2]] = None
    offload_optimizer: bool = False
    # The DeepSpeed engine's precision, as in pretraining: auto is bf16 on a GPU and fp32 on CPU. Plain PyTorch
    # (zero_stage unset) trains in fp32.
    precision: Literal["auto", "bf16", "fp32"] = "auto"

    def engine_settings(self, on_gpu: bool) -> EngineSettings:
        """The one-process DeepSpeed engine of a fine-tuning run (train.zero_stage set); its optimizer is torch's
        AdamW (Adafactor runs without DeepSpeed)."""
        return EngineSettings(
            micro_batch_size=self.batch_size, grad_clip=self.grad_clip, zero_stage=self.zero_stage,
            precision=self.precision, on_gpu=on_gpu, offload_optimizer=self.offload_optimizer)


class FinetuneConfig(_Job):
    model: FinetuneModelSection = FinetuneModelSection()
    data: FinetuneDataSection = FinetuneDataSection()
    tricks: TricksSection = TricksSection()
    train: FinetuneTrainSection = FinetuneTrainSection()
    run: FinetuneRunSection = Field(default_factory=FinetuneRunSection)

    @model_validator(mode="after")
    def _fits_task(self):
        from .finetune.tasks import TASKS

        task, spec = self.data.task, TASKS[self.data.task]
        if self.model.family != spec.family:
            raise ValueError(f"data.task {task!r} fine-tunes {spec.family}, not model.family "
                             f"{self.model.family!r}")
        if self.model.init_from:
            folder = Location.of(self.model.init_from)
            missing = [f for f in ("config.json", "vocab.txt") if not (folder / f).is_file()]
            if missing:
                raise ValueError(f"model.init_from {self.model.init_from!r} has no {' or '.join(missing)}: point it "
                                 "at a save_pretrained folder (e.g. <run.root>/<run.name>/model of a pretraining run)")
        if spec.data_folder and not (self.data.path and Path(self.data.path).expanduser().is_dir()):
            raise ValueError(f"data.path {self.data.path!r}: the {task} task needs {spec.data_folder}")
        if self.train.optimizer == "adafactor" and self.train.zero_stage is not None:
            raise ValueError("train.optimizer=adafactor runs without DeepSpeed (train.zero_stage unset): its steps "
                             "need whole tensors, which ZeRO would hand it cut into partitions")
        zero = self.train.zero_stage
        if self.train.precision == "bf16" and zero is None:
            raise ValueError("train.precision bf16 is the DeepSpeed engine's: set train.zero_stage (0, 1 or 2)")
        if self.train.offload_optimizer and not zero:
            raise ValueError("train.offload_optimizer needs train.zero_stage 1 or 2")
        for trick in TRICKS.values():
            if trick.active(self.tricks):
                trick.check(self, spec)
        return self


SWEEP_SAMPLERS = ("loguniform", "uniform", "choice", "randint")


class SweepConfig(_Strict):
    name: str = Field("sentiment-tricks", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    finetune: FinetuneConfig = FinetuneConfig()  # the base fine-tuning run every trial starts from
    # trick name -> overrides of the `tricks` section; "none" (no override) is the baseline of the comparison
    tricks: dict[str, dict] = {"none": {}}
    seeds: list[int] = Field([0, 1], min_length=1)
    # "section.key" of the fine-tuning config -> {"loguniform": [lo, hi]} | {"uniform": [lo, hi]} | {"choice": [...]} | {"randint": [lo, hi]}
    search: dict[str, dict[str, list]] = {}
    num_samples: int = Field(1, ge=1)  # hyperparameter samples per (trick, seed)
    # random: Tune samples `search` independently per trial. optuna: TPE proposes each trial's hyperparameters from
    # the results so far, while tricks and seeds still take turns (a balanced comparison).
    search_alg: Literal["random", "optuna"] = "random"
    scheduler: Literal["fifo", "asha"] = "fifo"  # ASHA stops weak trials early (they then have no test score)
    metric: str = "dev/accuracy"
    compare_on: str = "test/accuracy"  # of the best-dev epoch
    cpus_per_trial: float = Field(1.0, gt=0)
    gpus_per_trial: float = Field(0.0, ge=0)  # e.g. 1, or 0.25 to pack four small trials on a GPU
    max_concurrent_trials: Optional[int] = Field(None, ge=1)  # None: the cluster's CPUs / cpus_per_trial
    register_as: Optional[str] = "suformer-sentiment-classifier"  # registry name of the best-dev model

    @property
    def trials_dir(self) -> Path:
        """Where each trial keeps its best model (under the fine-tuning run root, a shared filesystem)."""
        return Path(self.finetune.run.root).expanduser().resolve() / self.name / "trials"

    @model_validator(mode="after")
    def _tricks_valid(self):
        if "none" not in self.tricks:
            raise ValueError("tricks: must include 'none' (the baseline every trick is compared with)")
        for name, overrides in self.tricks.items():
            base = self.finetune.model_dump()
            try:  # each trick on the sweep's own task and model
                FinetuneConfig.model_validate({**base, "tricks": {**base["tricks"], **overrides}})
            except Exception as e:  # noqa: BLE001 - re-raised with the trick named
                raise ValueError(f"tricks.{name}: {e}") from None
        return self

    @model_validator(mode="after")
    def _optuna_has_a_space(self):
        if self.search_alg == "optuna" and not self.search:
            raise ValueError("search_alg: optuna needs hyperparameters to search (the `search` section is empty)")
        return self

    @field_validator("search")
    @classmethod
    def _search_valid(cls, search):
        for key, spec in search.items():
            section, _, field = key.partition(".")
            known = FinetuneConfig.model_fields.get(section)
            if known is None or field not in known.annotation.model_fields:
                raise ValueError(f"{key}: not a fine-tuning setting (use section.key, e.g. train.lr)")
            if len(spec) != 1 or next(iter(spec)) not in SWEEP_SAMPLERS:
                raise ValueError(f"{key}: expected one of {SWEEP_SAMPLERS} with its arguments, got {spec}")
        return search


def job_arguments(description: str, default_config: str, example: str, argv=None):
    """The command line every job shares: --config FILE and repeatable --set key=value overrides."""
    import argparse

    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=default_config)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override a config key, e.g. --set {example} (repeatable)")
    return parser.parse_args(argv)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. train.max_steps=200")
    key, value = item.split("=", 1)
    return key.strip().split("."), yaml.safe_load(value) if value != "" else ""


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None, schema=PretrainConfig):
    """YAML file + dotted overrides -> validated `schema`; any problem is a ConfigError naming the key."""
    source = path or "<overrides>"
    raw: dict = {}
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(raw).__name__}")
    for item in overrides or []:
        keys, value = _parse_override(item)
        node = raw
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {key} is not a section")
        node[keys[-1]] = value
    try:
        return schema.model_validate(raw)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            where = ".".join(str(p) for p in err["loc"]) or "(top level)"
            if err["type"] == "extra_forbidden":
                problems.append(f"  {where}: unknown key")
                continue
            got = "" if isinstance(err.get("input"), dict) else f" (got {err['input']!r})"
            problems.append(f"  {where}: {err['msg'].removeprefix('Value error, ')}{got}")
        raise ConfigError(f"{source}: invalid config\n" + "\n".join(problems)) from None
