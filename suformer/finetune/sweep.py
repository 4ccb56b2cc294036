"""Trick sweeps: a Ray Tune grid over tricks x seeds (plus sampled hyperparameters), one fine-tuning run per trial,
one MLflow parent run per sweep with a child run per trial, and a comparison table + plot on the parent.

The trials log to MLflow themselves (the parent id travels in their config): Ray's MLflowLoggerCallback runs on the
Tune driver and knows nothing of parent runs. The comparison is built from the child runs, the record that
outlives the Tune results folder.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from pathlib import Path

from ..config import FinetuneConfig, SweepConfig

TRICK_TAG, SEED_TAG, STOPPED_EARLY_TAG = "suformer.trick", "suformer.seed", "suformer.stopped_early"
TRIAL_TAG = "suformer.trial_id"  # Tune's trial id, to settle a run its trial could not close


def trial_config(sweep: SweepConfig, trick: str, seed: int, sampled: dict) -> FinetuneConfig:
    """The base fine-tuning config with one trick, one seed and the sampled hyperparameters applied."""
    raw = sweep.finetune.model_dump()
    raw["tricks"].update(sweep.tricks[trick])
    raw["train"]["seed"] = seed
    for key, value in sampled.items():
        section, field = key.split(".", 1)
        raw[section][field] = value
    return FinetuneConfig.model_validate(raw)


def _sampler(spec: dict):
    from ray import tune

    kind, args = next(iter(spec.items()))
    return {"loguniform": tune.loguniform, "uniform": tune.uniform, "randint": tune.randint}[kind](*args) \
        if kind != "choice" else tune.choice(args)


class _OptunaSpace:
    """Optuna's TPE proposes the `search` hyperparameters of each trial (define-by-run); the trick and seed are
    constants assigned by trial number, so every (trick, seed) pair gets `num_samples` trials as in the grid. TPE
    thus looks for hyperparameters that do well across tricks. (A class, not a closure: Tune pickles it.)"""

    def __init__(self, sweep: SweepConfig):
        self.search, self.tricks, self.seeds = sweep.search, list(sweep.tricks), sweep.seeds

    def __call__(self, trial) -> dict:
        for key, spec in self.search.items():
            kind, args = next(iter(spec.items()))
            if kind == "choice":
                trial.suggest_categorical(key, args)
            elif kind == "randint":  # Tune's randint excludes the upper bound, Optuna's includes it
                trial.suggest_int(key, args[0], args[1] - 1)
            else:
                trial.suggest_float(key, args[0], args[1], log=kind == "loguniform")
        turn, trick = divmod(trial.number, len(self.tricks))  # each turn runs every trick once
        return {"trick": self.tricks[trick], "seed": self.seeds[turn % len(self.seeds)]}


def _run_trial(config: dict, sweep_json: str, parent_id: str) -> None:
    """One Tune trial: a child MLflow run, the fine-tuning, the best model saved for registration."""
    from ray import tune

    from .. import tracking
    from .loop import finetune, save_finetuned

    sweep = SweepConfig.model_validate_json(sweep_json)
    sampled = config.get("search") or {k: v for k, v in config.items() if k in sweep.search}  # random | optuna
    cfg = trial_config(sweep, config["trick"], config["seed"], sampled)
    uri = cfg.tracking_uri
    run_id = tracking.create_child_run(uri, cfg.run.experiment, parent_id, f"{config['trick']}-seed{config['seed']}",
                                       tags={TRICK_TAG: config["trick"], SEED_TAG: str(config["seed"]),
                                             TRIAL_TAG: tune.get_context().get_trial_id()})
    with tracking.owned_run(uri, run_id):
        tracking.log_params(uri, run_id, {**cfg.flat(), "sweep.trick": config["trick"]})
        try:
            out = finetune(cfg, run_id, report=tune.report)
        except SystemExit:  # the scheduler (ASHA) stopped the trial: tune.report exits the training thread.
            # Best effort, as is owned_run's KILLED: Tune may tear the actor down while these are under way;
            # run_sweep settles the run either way.
            tracking.set_tag(uri, run_id, STOPPED_EARLY_TAG, "true")
            raise
        save_finetuned(out, cfg, sweep.trials_dir / run_id)


def close_orphaned_runs(uri: str, children: list, clean_trials: set) -> None:
    """Settle the child runs their trials left RUNNING. Tune stops a trial by exiting its training thread inside
    `tune.report` and then tears the actor down without waiting for that thread, so a stopped trial's own handler
    can be cut off inside its MLflow calls (seen on a loaded machine). The driver knows how each trial ended: one
    Tune ended without error (`clean_trials`, by trial id) was stopped early, so KILLED and tagged; any other (it
    raised, or its process died with a lost node) is FAILED."""
    from .. import tracking

    for child in children:
        if child.info.status != "RUNNING":
            continue
        stopped_early = child.data.tags.get(TRIAL_TAG) in clean_trials
        if stopped_early:
            tracking.set_tag(uri, child.info.run_id, STOPPED_EARLY_TAG, "true")
        tracking.finish_run(uri, child.info.run_id, "KILLED" if stopped_early else "FAILED")


def comparison(children: list[dict], compare_on: str) -> list[dict]:
    """Per trick: the metric's mean and spread over its trials, the difference from "none" with Welch's t-test,
    trainable parameters, time per epoch and peak memory. `children`: {"trick", "metrics"} per finished trial."""
    from scipy import stats

    by_trick: dict[str, list[dict]] = {}
    for child in children:
        by_trick.setdefault(child["trick"], []).append(child["metrics"])
    baseline = [m[compare_on] for m in by_trick.get("none", []) if compare_on in m]
    rows = []
    for trick, runs in sorted(by_trick.items(), key=lambda kv: (kv[0] != "none", kv[0])):
        values = [m[compare_on] for m in runs if compare_on in m]
        if not values:
            continue
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
        row = {"trick": trick, "runs": len(values), "mean": mean, "std": std, "values": values,
               "diff_vs_none": mean - sum(baseline) / len(baseline) if baseline else float("nan"),
               "p_value": float("nan"),
               "trainable_params": int(runs[0].get("params/trainable", 0)),
               "epoch_time_s": sum(m.get("time/epoch_s", 0) for m in runs) / len(runs),
               "peak_memory_mb": max(m.get("memory/peak_mb", 0) for m in runs)}
        spread = row["std"] > 0 or len(set(baseline)) > 1  # no spread at all: the t statistic is undefined
        if trick != "none" and len(values) > 1 and len(baseline) > 1 and spread:
            with warnings.catch_warnings():  # scipy warns when one group's values are all equal; the test holds
                warnings.simplefilter("ignore", RuntimeWarning)
                row["p_value"] = float(stats.ttest_ind(values, baseline, equal_var=False).pvalue)
        rows.append(row)
    return rows


def comparison_markdown(rows: list[dict], compare_on: str) -> str:
    lines = [f"| trick | runs | {compare_on} mean ± std | Δ vs none | p (Welch) | trainable params | s / epoch | "
             "peak MB |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        delta = "" if r["trick"] == "none" else f"{r['diff_vs_none']:+.4f}"
        p = "" if math.isnan(r["p_value"]) else f"{r['p_value']:.3f}"
        lines.append(f"| {r['trick']} | {r['runs']} | {r['mean']:.4f} ± {r['std']:.4f} | {delta} | {p} | "
                     f"{r['trainable_params']:,} | {r['epoch_time_s']:.1f} | {r['peak_memory_mb']:.0f} |")
    return "\n".join(lines)


def comparison_plot(rows: list[dict], compare_on: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (score, cost) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    names = [r["trick"] for r in rows]
    score.bar(names, [r["mean"] for r in rows], yerr=[r["std"] for r in rows], capsize=4, color="#8fb3d9")
    for i, r in enumerate(rows):
        score.scatter([i] * len(r["values"]), r["values"], color="#1f3f66", zorder=3, s=14)
    low = min(v for r in rows for v in r["values"])
    score.set_ylim(max(0.0, low - 0.05), min(1.0, max(r["mean"] + r["std"] for r in rows) + 0.03))
    score.set_title(f"{compare_on} (bars: mean ± std over seeds; dots: runs)")
    cost.bar(names, [r["epoch_time_s"] for r in rows], color="#d9a58f")
    cost.set_title("seconds per epoch")
    for ax in (score, cost):
        ax.tick_params(axis="x", rotation=30)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_sweep(sweep: SweepConfig, stop: dict | None = None) -> dict:
    """Run the sweep on the connected (or a local) Ray cluster; returns the parent run id and the comparison.
    `stop`: Tune stop criteria for every trial (RunConfig.stop), e.g. {"epoch": 1} for a smoke sweep; a trial
    stopped by them ends like one ASHA stopped."""
    from .. import tracking
    from ..ray_connect import connect_or_start

    base = sweep.finetune
    uri = base.tracking_uri  # resolved when the config was loaded: trials on other nodes use the same store
    root = Path(base.run.root).expanduser().resolve()
    connect_or_start()
    # A new parent per sweep run: children of an earlier sweep with the same name must not enter this comparison.
    parent_id, _ = tracking.open_run(uri, base.run.experiment, sweep.name, run_root=root,
                                     tags={"suformer.kind": "sweep"}, resume=False)
    with tracking.owned_run(uri, parent_id) as parent:
        tracking.log_params(uri, parent_id, {"sweep.tricks": json.dumps(sweep.tricks), "sweep.seeds": sweep.seeds,
                                             "sweep.search": json.dumps(sweep.search), "sweep.metric": sweep.metric,
                                             "sweep.scheduler": sweep.scheduler, **base.flat()})
        grid = _tuner(sweep, parent_id, root, stop).fit()

        children = tracking.child_runs(uri, parent_id)
        close_orphaned_runs(uri, children, clean_trials={r.metrics.get("trial_id") for r in grid if r.error is None})
        finished = [{"trick": c.data.tags[TRICK_TAG], "metrics": c.data.metrics, "run_id": c.info.run_id}
                    for c in children if c.info.status == "FINISHED"]
        rows = comparison(finished, sweep.compare_on)
        table = comparison_markdown(rows, sweep.compare_on)
        _log_comparison(uri, parent_id, rows, table, sweep.compare_on)
        registered = None
        if sweep.register_as and finished:
            best = max(finished, key=lambda c: c["metrics"].get(f"best_{sweep.metric}", float("-inf")))
            registered = _register(uri, best["run_id"], sweep.trials_dir / best["run_id"], sweep.register_as)
            tracking.set_tag(uri, parent_id, "suformer.best_child", best["run_id"])
        if grid.errors:
            parent.end_status = "FAILED"  # the sweep ran to its end, but the comparison lacks the failed trials
    return {"parent_run_id": parent_id, "rows": rows, "table": table, "children": len(children),
            "errors": len(grid.errors), "registered": registered, "tune_path": grid.experiment_path,
            "tracking_uri": uri, "experiment": base.run.experiment}


def _tuner(sweep: SweepConfig, parent_id: str, root: Path, stop: dict | None):
    """Tune's grid (or Optuna search) over tricks x seeds, as many trials at once as the cluster fits."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    search_alg, num_samples = None, sweep.num_samples
    if sweep.search_alg == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        space = {}
        search_alg = OptunaSearch(space=_OptunaSpace(sweep), metric=sweep.metric, mode="max", seed=sweep.seeds[0])
        num_samples = sweep.num_samples * len(sweep.tricks) * len(sweep.seeds)
    else:
        space = {"trick": tune.grid_search(list(sweep.tricks)), "seed": tune.grid_search(sweep.seeds)}
        if sweep.search:
            space["search"] = {key: _sampler(spec) for key, spec in sweep.search.items()}
    resources = ray.cluster_resources()
    fits = resources.get("CPU", 1) // sweep.cpus_per_trial
    if sweep.gpus_per_trial:
        fits = min(fits, resources.get("GPU", 0) // sweep.gpus_per_trial)
    concurrent = sweep.max_concurrent_trials or max(1, int(fits))
    # max_t one past the last epoch: ASHA stops a trial that reaches max_t right after that report, which would
    # cut every trial off before its test evaluation.
    scheduler = ASHAScheduler(time_attr="epoch", max_t=sweep.finetune.train.epochs + 1, grace_period=1) \
        if sweep.scheduler == "asha" else FIFOScheduler()
    trainable = tune.with_resources(tune.with_parameters(_run_trial, sweep_json=sweep.model_dump_json(),
                                                         parent_id=parent_id),
                                   {"cpu": sweep.cpus_per_trial, "gpu": sweep.gpus_per_trial})
    return tune.Tuner(
        trainable, param_space=space,
        tune_config=tune.TuneConfig(metric=sweep.metric, mode="max", scheduler=scheduler, search_alg=search_alg,
                                    num_samples=num_samples, max_concurrent_trials=concurrent),
        run_config=tune.RunConfig(name=sweep.name, storage_path=str(root / "tune"), stop=stop, verbose=1),
    )


def _log_comparison(uri: str, parent_id: str, rows: list[dict], table: str, compare_on: str) -> None:
    from .. import tracking

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "comparison.md").write_text(table + "\n")
        (Path(tmp) / "comparison.json").write_text(json.dumps(rows, indent=2))
        if rows:
            comparison_plot(rows, compare_on, Path(tmp) / "comparison.png")
        tracking.log_artifacts(uri, parent_id, tmp, "comparison")


def _register(uri: str, run_id: str, saved: Path, name: str) -> str:
    """Log the best trial's model (LoRA merged) on its child run and register it; returns 'name/version'."""
    import mlflow

    from .loop import load_finetuned

    model, _, _ = load_finetuned(saved)
    # log_model and register_model are fluent-API only. mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI
    # to this process's environment, where every later config would pick it up: both are restored afterwards.
    previous_uri, previous_env = mlflow.get_tracking_uri(), os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        with mlflow.start_run(run_id=run_id):
            # pickle: loading needs suformer importable (as the requirements say); pt2 would freeze the input shape
            info = mlflow.pytorch.log_model(model, name="model", serialization_format="pickle",
                                            pip_requirements=["torch", "suformer"])
            mlflow.log_artifacts(str(saved), "model_files")  # tokenizer + fine-tuning config beside the weights
        version = mlflow.register_model(info.model_uri, name)
    finally:
        mlflow.set_tracking_uri(previous_uri)
        if previous_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous_env
    return f"{name}/{version.version}"
