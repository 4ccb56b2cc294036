"""DeepSpeed's just-in-time built C++ ops, loaded so that a killed build cannot hang every later run.

torch builds an extension under ~/.cache/torch_extensions (or $TORCH_EXTENSIONS_DIR) and marks the build with a
plain `lock` file; every other process waits for that file to disappear. A build killed half-way (a Ray job
stopped, a machine rebooted) leaves the file behind, and from then on each DeepSpeed start on the machine waits
forever. Here the ops a run needs are loaded first, under an OS file lock (flock) on the extensions folder: the
kernel releases it when its holder dies, so whoever holds it knows that no suformer process is building, and a
`lock` file it finds is stale. Once loaded, DeepSpeed's own load of the same op returns the cached module.
"""
from __future__ import annotations

import fcntl
import os
import sys
from contextlib import contextmanager
from pathlib import Path


def ops_for(use_gpu: bool) -> list[str]:
    """The JIT ops a DeepSpeed engine will load: on CPU the shared-memory collective op (built when its comm
    backend starts). The CPU Adam kernel of an offloaded optimizer state is loaded by `optimizers.adamw`."""
    return ["ShareMemCommBuilder"] if not use_gpu else []


def load_deepspeed_ops(names: list[str]) -> None:
    """Build (once per machine) and load the named DeepSpeed op builders' ops, clearing stale build locks."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator
    from torch.utils.cpp_extension import _get_build_directory

    for name in names:
        builder = get_accelerator().create_op_builder(name)
        if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
            continue  # DeepSpeed skips it too
        build_dir = Path(_get_build_directory(builder.NAME, verbose=False))
        with open(build_dir.parent / ".suformer-build.lock", "w") as held, _environments_ninja_first():
            fcntl.flock(held, fcntl.LOCK_EX)
            (build_dir / "lock").unlink(missing_ok=True)  # under the flock, nobody is building: a leftover
            builder.load(verbose=False)


@contextmanager
def _environments_ninja_first():
    """torch builds with the first `ninja` on PATH. The environment's own (the `ninja` package DeepSpeed depends
    on, 1.13 here) and a system one (1.11) each read the other's build log as "too old" and rebuild the op from
    scratch, minutes on a small machine, whenever processes with different PATHs (a shell, a Ray worker) load it:
    every process here uses the environment's."""
    path = os.environ.get("PATH", "")
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{path}"
    try:
        yield
    finally:
        os.environ["PATH"] = path


if __name__ == "__main__":  # `make setup`: build this machine's ops once, before a first run waits for them
    import torch

    from .engine import deepspeed_process_settings

    deepspeed_process_settings(torch.cuda.is_available())
    load_deepspeed_ops(ops_for(torch.cuda.is_available()))
