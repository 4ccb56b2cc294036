"""A build lock left by a killed extension build must not hang the next DeepSpeed start on the machine."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

def _built_shm_op() -> Path:
    """This machine's build folder of DeepSpeed's shared-memory op, built if it is not yet."""
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder
    from torch.utils.cpp_extension import _get_build_directory

    from suformer.train.jit_ops import load_deepspeed_ops

    load_deepspeed_ops(["ShareMemCommBuilder"])
    return Path(_get_build_directory(ShareMemCommBuilder.NAME, verbose=False))


def _deepspeed_loads_op(extensions: Path, preload: bool, timeout: float) -> bool:
    """Whether DeepSpeed's comm backend gets its op within `timeout` s in a fresh process."""
    code = ("from suformer.train.jit_ops import load_deepspeed_ops; load_deepspeed_ops(['ShareMemCommBuilder']); "
            if preload else "") + "from deepspeed.comm.torch import build_shm_op; assert build_shm_op() is not None"
    try:
        proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions)},
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False
    assert proc.returncode == 0, proc.stderr[-2000:]
    return True


def test_a_stale_build_lock_hangs_deepspeed_but_not_a_run_that_loads_its_ops_first(tmp_path):
    built = _built_shm_op()
    for name in ("bare", "suformer"):  # the built op in a private extensions folder, plus a killed build's lock
        shutil.copytree(built, tmp_path / name / built.name)
        (tmp_path / name / built.name / "lock").touch()

    assert not _deepspeed_loads_op(tmp_path / "bare", preload=False, timeout=15)  # the trap is real: it waits
    assert _deepspeed_loads_op(tmp_path / "suformer", preload=True, timeout=180)
    assert not (tmp_path / "suformer" / built.name / "lock").exists()



def test_a_process_with_another_ninja_first_on_its_path_does_not_rebuild_the_op(tmp_path):
    """A shell and a Ray worker may find different `ninja`s first on PATH (a system one, the environment's): each
    reads the other's build log as too old and rebuilds the op from scratch (minutes). The loader uses the
    environment's in every process."""
    system_ninja = shutil.which("ninja", path=os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep)
                                                              if Path(p) != Path(sys.executable).parent))
    if system_ninja is None:
        import pytest

        pytest.skip("no ninja on PATH besides the environment's")
    built = _built_shm_op()  # by the loader: the environment's ninja wrote its build log
    shutil.copytree(built, tmp_path / built.name)
    library = tmp_path / built.name / f"{built.name}.so"
    before = library.stat().st_mtime_ns
    code = "from suformer.train.jit_ops import load_deepspeed_ops; load_deepspeed_ops(['ShareMemCommBuilder'])"
    path = os.pathsep.join([str(Path(system_ninja).parent), os.environ["PATH"]])  # the system's ninja first
    subprocess.run([sys.executable, "-c", code], env={**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path),
                                                      "PATH": path}, check=True, capture_output=True, timeout=300)
    assert library.stat().st_mtime_ns == before, "the op was built again"
