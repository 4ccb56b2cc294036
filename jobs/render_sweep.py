"""Render the MLflow compare view of a finished sweep (its child runs side by side) to a PNG with headless Chromium,
to see in a README or a report what `mlflow ui` shows.

    python jobs/render_sweep.py --config jobs/configs/sweep_sentiment_tiny_cpu.yaml --out docs/sweep_compare.png

The sweep is found by its name (the newest parent run) in the config's tracking store. A SQLite store gets a
temporary `mlflow server` on 127.0.0.1; an http(s) tracking URI is opened as it is (without a login: the browser
cannot send one). Needs Debian's `chromium` (`make setup` installs it).
Exit status: 0 done, 2 bad config or no such sweep, 1 rendering failed.
"""
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from suformer.config import ConfigError, SweepConfig, load_config

CHROMIUM = ("chromium", "chromium-browser", "google-chrome")


@contextmanager
def mlflow_ui(tracking_uri: str):
    """The base URL of an MLflow UI for `tracking_uri`: the server itself, or a temporary one for a local store."""
    if tracking_uri.startswith(("http://", "https://")):
        yield tracking_uri.rstrip("/")
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mlflow = str(Path(sys.executable).parent / "mlflow")
    with tempfile.TemporaryDirectory() as artifacts:
        proc = subprocess.Popen([mlflow, "server", "--backend-store-uri", tracking_uri, "--host", "127.0.0.1",
                                 "--port", str(port), "--workers", "1", "--default-artifact-root", artifacts],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + 120
            while True:
                try:
                    urllib.request.urlopen(url + "/health", timeout=2)
                    break
                except OSError:
                    if proc.poll() is not None or time.time() > deadline:
                        raise RuntimeError(f"mlflow server for {tracking_uri} did not start") from None
                    time.sleep(0.5)
            yield url
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def compare_view_url(base: str, experiment_id: str, run_ids: list[str]) -> str:
    query = urllib.parse.urlencode({"runs": json.dumps(run_ids), "experiments": json.dumps([experiment_id])})
    return f"{base}/#/compare-runs?{query}"


def screenshot(url: str, out: Path, timeout: int = 180) -> str:
    """Headless Chromium on `url`: a PNG of the page to `out`, and the rendered DOM returned. Virtual time lets the
    page's own requests to the tracking server finish before the capture."""
    binary = next((shutil.which(b) for b in CHROMIUM if shutil.which(b)), None)
    if binary is None:
        raise RuntimeError("no Chromium found: apt-get install chromium (or run make setup)")
    command = [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--hide-scrollbars", "--window-size=1600,1800", "--virtual-time-budget=20000",
               f"--screenshot={out.resolve()}", "--dump-dom", url]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=True).stdout


def render_compare_view(tracking_uri: str, experiment: str, sweep_name: str, out: Path) -> str:
    """Screenshot the compare view of the newest sweep named `sweep_name` to `out`; returns the rendered page's
    DOM (what a test reads)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    parents = client.search_runs([found.experiment_id], filter_string=(
        f"tags.`suformer.kind` = 'sweep' and attributes.run_name = '{sweep_name}'"),
        order_by=["attributes.start_time DESC"], max_results=1) if found else []
    if not parents:
        raise LookupError(f"no sweep named {sweep_name!r} in experiment {experiment!r} of {tracking_uri}")
    parent = parents[0]
    children = client.search_runs([found.experiment_id], max_results=1000,
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    url_ids = [c.info.run_id for c in sorted(children, key=lambda c: c.info.run_name)]
    out.parent.mkdir(parents=True, exist_ok=True)
    with mlflow_ui(tracking_uri) as base:
        return screenshot(compare_view_url(base, found.experiment_id, url_ids), out)


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="sweep_compare.png", help="the PNG to write")
    parser.add_argument("--config", default="jobs/configs/sweep_sentiment_tiny_cpu.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        sweep = load_config(args.config, args.overrides, schema=SweepConfig)
        base = sweep.finetune
        render_compare_view(base.tracking_uri, base.run.experiment, sweep.name, Path(args.out))
    except (ConfigError, LookupError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"[suformer] compare view of sweep {sweep.name!r}: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
