"""Sweep fine-tuning tricks with Ray Tune; every trial is an MLflow child run of one parent run per sweep.

    python jobs/sweep.py --config jobs/configs/sweep_sentiment_tiny_cpu.yaml [--set seeds=[0,1,2] ...]
    ray job submit --working-dir . -- python jobs/sweep.py --config jobs/configs/sweep_sentiment_tiny_cpu.yaml

Prints the comparison table (also on the parent run: comparison/comparison.md, .json, .png) and where to look.
Exit status: 0 done, 2 bad config (nothing started), 1 a trial failed (the table covers the finished ones).
"""
import os
import sys

from suformer.config import ConfigError, SweepConfig, job_arguments, load_config


def main(argv=None) -> int:
    args = job_arguments(__doc__, "jobs/configs/sweep_sentiment_tiny_cpu.yaml", "finetune.train.epochs=3", argv)
    try:
        sweep = load_config(args.config, args.overrides, schema=SweepConfig)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not os.environ.get("RAY_ADDRESS"):
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    from suformer.tracking import browse_lines
    from suformer.finetune.sweep import run_sweep

    result = run_sweep(sweep)
    print(f"\n[suformer] sweep {sweep.name}: {result['children']} trials, {result['errors']} failed\n")
    print(result["table"])
    if result["registered"]:
        print(f"\n[suformer] best dev model registered as {result['registered']}")
    print(f"\n[suformer] MLflow parent run {result['parent_run_id']} in experiment {result['experiment']!r}:")
    print(browse_lines(result["tracking_uri"], result["parent_run_id"]))
    print(f"[suformer] Tune results: tensorboard --logdir {result['tune_path']}")
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
