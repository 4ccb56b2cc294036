import itertools
import os

import pytest
import torch

if not torch.cuda.is_available():
    # The Triton kernels run under the CPU interpreter here; it is chosen when triton is first imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from suformer.data.corpora import peoples_daily, review_sentences
from suformer.tokenizer import Tokenizer, build_vocab, write_vocab


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def news():
    return list(itertools.islice(peoples_daily(), 3000))


@pytest.fixture(scope="session")
def reviews():
    return list(itertools.islice(review_sentences("pos"), 1000)) + list(itertools.islice(review_sentences("neg"), 1000))


@pytest.fixture(scope="session")
def vocab_file(tmp_path_factory, news, reviews):
    """A T5-PEGASUS-style word+char vocab built from the bundled corpora (no hub downloads here)."""
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    write_vocab(build_vocab(news[:2000] + reviews[:1000], 12000), path)
    return path


@pytest.fixture(scope="session")
def char_vocab_file(tmp_path_factory, news, reviews):
    path = tmp_path_factory.mktemp("char_vocab") / "vocab.txt"
    write_vocab(build_vocab(news[:2000] + reviews[:1000], 6000, words=False), path)
    return path


@pytest.fixture(scope="session")
def tokenizer(vocab_file):
    return Tokenizer(vocab_file, pre_tokenize="jieba")


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """A real local Ray cluster for the whole session: token auth on, dashboard on 127.0.0.1 only."""
    import os
    import secrets
    import subprocess
    import sys
    import time
    from pathlib import Path
    from types import SimpleNamespace

    bin_dir = Path(sys.executable).parent
    token = secrets.token_hex(32)
    port, dashboard_port = _free_port(), _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    subprocess.run(
        [str(bin_dir / "ray"), "start", "--head", f"--port={port}", "--num-cpus=6",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", "--include-dashboard=true",
         "--disable-usage-stats"],
        env=env, check=True, capture_output=True,
    )
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)  # before ray is imported: read at import
    import ray

    address = f"127.0.0.1:{port}"
    ray.init(address=address, log_to_driver=False)
    deadline = time.time() + 60
    while ray.cluster_resources().get("CPU", 0) < 6 and time.time() < deadline:
        time.sleep(0.5)
    try:
        yield SimpleNamespace(address=address, dashboard=f"http://127.0.0.1:{dashboard_port}", env=env, token=token)
    finally:
        ray.shutdown()
        subprocess.run([str(bin_dir / "ray"), "stop", "--force"], env=env, capture_output=True)
