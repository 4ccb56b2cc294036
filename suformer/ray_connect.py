"""Where a job's Ray comes from: the cluster it was submitted to, or a private local instance that ends with it."""
from __future__ import annotations

import logging
import os


def connect_or_start(num_cpus: int | None = None) -> None:
    """Join the cluster RAY_ADDRESS names (`ray job submit` sets it), else start a local instance (the jobs turn
    token auth on for it before Ray is first imported, when Ray reads that setting).

    `address="local"`: without it ray.init joins whatever Ray instance it finds running on the machine (another
    user's job, a local cluster started without its env) and then refuses `num_cpus` with a traceback.
    """
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"])
    else:
        ray.init(address="local", num_cpus=num_cpus)


def _not_the_progress_bar_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Progress bars disabled")  # we disabled them, on purpose


def _not_a_corpus_error(record: logging.LogRecord) -> bool:
    """Ray Data logs a task's exception with its whole traceback before the driver sees it; a DataError (a bad
    line deep in a corpus file) is then printed once, by the job, as one line naming the file and line."""
    from .pretrain.data.corpus import DataError

    return not (record.exc_info and isinstance(record.exc_info[1], DataError))


def ray_data_console_warnings_only() -> None:
    """Ray Data writes every execution's plan and a progress report every few seconds to the console at INFO
    level, warns that progress bars are off where they are, and logs the traceback of a bad corpus line the job
    reports itself: between the step lines a user reads that as noise or trouble. Raise its console handler to
    WARNING, less those, in this process (the job's driver, where the data stage runs); its log file
    (ray-data.log in the Ray session's logs) keeps everything."""
    import ray.data  # noqa: F401 - configures the "ray.data" logger on import
    from ray.data._internal.logging import SessionFileHandler

    for handler in logging.getLogger("ray.data").handlers:
        if not isinstance(handler, SessionFileHandler):
            handler.setLevel(logging.WARNING)
            for quiet in (_not_the_progress_bar_notice, _not_a_corpus_error):
                if quiet not in handler.filters:
                    handler.addFilter(quiet)
