"""Pretrain T5 PEGASUS or RoFormerV2 with DeepSpeed ZeRO on Ray Train workers, tracked in MLflow.

    python jobs/pretrain.py --config jobs/configs/t5_pegasus_tiny_cpu.yaml [--set train.max_steps=200 ...]
    ray job submit --working-dir . -- python jobs/pretrain.py --config jobs/configs/t5_pegasus_tiny_cpu.yaml

Without a running cluster (no RAY_ADDRESS), the first form starts a local Ray instance. Resubmitting the same
run.name resumes from its latest checkpoint and keeps logging into the same MLflow run.
Exit status: 0 done, 2 bad config or input (nothing started), 1 training failed.
"""
import os
import sys

from suformer.config import RESUBMIT_MUTABLE, ConfigError, job_arguments, load_config
from suformer.pretrain.data.corpus import DataError, preflight
from suformer.pretrain.data.dataset import check_makes_examples, check_vocab, vocab_for_init
from suformer.storage import Location
from suformer.tracking import browse_lines, changed_settings, recorded_params


def main(argv=None) -> int:
    args = job_arguments(__doc__, "jobs/configs/t5_pegasus_tiny_cpu.yaml", "train.max_steps=200", argv)
    if not os.environ.get("RAY_ADDRESS"):
        # The local instance this starts uses token auth too; set before anything imports ray (the corpus reader
        # does), which reads it once.
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    try:
        cfg = load_config(args.config, args.overrides)
        if cfg.model.init_from:
            vocab_for_init(cfg.model.init_from, cfg.data.vocab)
        elif cfg.data.vocab:
            check_vocab(cfg.data.vocab, cfg.data.objective)
        tracking_uri = cfg.tracking_uri  # a run root on object storage needs a tracking store of its own
        try:  # an object store's bucket is looked up here; a local root is made when it is first written
            root = Location.of(cfg.run.root)
            bucket = root.path.split("/")[0]
            if not root.is_local and not Location(root.fs, bucket).is_dir():
                raise ValueError(f"bucket {bucket!r} not found")
        except (OSError, ValueError) as error:
            raise ConfigError(f"run.root {cfg.run.root!r}: {error}") from None
        corpus = preflight(cfg.data)  # every file listed and its start read: bad input is named here
        check_makes_examples(cfg.data, corpus)
        changed = changed_settings(recorded_params(tracking_uri, cfg.run.experiment, cfg.run.name), cfg.flat(),
                                   RESUBMIT_MUTABLE)
        if changed:
            raise ConfigError(f"run.name {cfg.run.name!r} already exists with other values for {', '.join(changed)}: "
                              "resubmit with its settings to resume it, or choose a new run.name")
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from suformer.pretrain.driver import TrainingStopped, run_pretraining

    try:
        result = run_pretraining(cfg, corpus)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"\n[suformer] done. Exported model: {result['model_dir']}")
    print(f"[suformer] MLflow run {result['run_id']} in experiment {result['experiment']!r}. Browse it with:")
    print(browse_lines(result["tracking_uri"], result["run_id"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
