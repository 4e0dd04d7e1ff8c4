"""The served TTA model (``mlflow models serve``, model ``ltta-tta``) under a bounded burst of
concurrent requests: errors, wrong answers, latency percentiles and throughput.

Each request is a batch of ``--batch`` images sent as JSON to ``/invocations``; ``--concurrency``
clients send ``--requests`` requests in all, as fast as answers come back. Every answer is checked
against the same model loaded in process (``mlflow.pyfunc.load_model``) on the same images: a
wrong label or probability off by more than 1e-5 counts as a wrong answer.

The ceiling is the in-process model's rate on the same batches, one after another (no HTTP, no
JSON); ``ratio`` = served images/s / in-process images/s, so 1.0 means serving costs nothing
over the model itself. The server's worker count (``--workers``) and the machine decide the rest.

    python benchmarks/serving_load.py --model-uri models:/ltta-tta@champion --images data/prepared/test.npz
    python benchmarks/serving_load.py --url http://127.0.0.1:5001 --model-uri models:/ltta-tta@champion ...
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from ltta.io import write_json  # noqa: E402


def post(url: str, images: np.ndarray, timeout: float = 120) -> tuple[int, dict[str, Any], float]:
    """One request: (HTTP status, JSON body, seconds)."""
    body = json.dumps({"inputs": images.astype(int).tolist()}).encode()
    req = urllib.request.Request(url.rstrip("/") + "/invocations", data=body, headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, payload = resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        status, payload = exc.code, json.loads(exc.read() or b"{}")
    except OSError as exc:
        status, payload = 0, {"message": f"{type(exc).__name__}: {exc}"}
    return status, payload, time.perf_counter() - t0


def burst(url: str, batches: list[np.ndarray], concurrency: int) -> tuple[list[tuple[int, dict, float]], float]:
    """Send every batch, ``concurrency`` at a time; the answers in batch order and the wall time."""
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=concurrency) as pool:
        answers = list(pool.map(lambda b: post(url, b), batches))
    return answers, time.perf_counter() - t0


def check(answers: list[tuple[int, dict, float]], expected: list[dict[str, np.ndarray]]) -> dict[str, int]:
    """Count failed requests and wrong answers against the in-process model's outputs."""
    errors = wrong = 0
    for (status, body, _), want in zip(answers, expected, strict=True):
        if status != 200:
            errors += 1
            continue
        got = body["predictions"]
        probs = np.asarray(got["probabilities"], dtype=np.float32)
        if (probs.shape != want["probabilities"].shape or np.abs(probs - want["probabilities"]).max() > 1e-5
                or not np.array_equal(np.asarray(got["label"]), want["label"])
                or not np.array_equal(np.asarray(got["candidates"]), want["candidates"])):
            wrong += 1
    return {"errors": errors, "wrong": wrong}


def percentiles(seconds: list[float]) -> dict[str, float]:
    a = np.asarray(seconds) * 1000.0
    return {f"p{q}_ms": round(float(np.percentile(a, q)), 1) for q in (50, 90, 99)} | {
        "max_ms": round(float(a.max()), 1), "mean_ms": round(float(a.mean()), 1)}


def in_process(model: Any, batches: list[np.ndarray]) -> tuple[list[dict[str, np.ndarray]], float]:
    """The loaded model's outputs per batch and its images/s, one batch after another (the ceiling)."""
    model.predict(batches[0].astype(np.float32))  # warm-up
    t0 = time.perf_counter()
    outs = [{k: np.asarray(v) for k, v in model.predict(b.astype(np.float32)).items()} for b in batches]
    return outs, sum(len(b) for b in batches) / (time.perf_counter() - t0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serving(model_uri: str, workers: int, log: Path) -> Iterator[str]:
    """``mlflow models serve`` on 127.0.0.1 (this interpreter's environment) until the block ends."""
    port = _free_port()
    exe = Path(sys.executable).parent / "mlflow"
    cmd = [str(exe), "models", "serve", "-m", model_uri, "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port),
           "-w", str(workers)]
    env = dict(os.environ, PATH=f"{exe.parent}{os.pathsep}{os.environ.get('PATH', '')}")
    url = f"http://127.0.0.1:{port}"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + 180
            while True:
                with contextlib.suppress(OSError):
                    with urllib.request.urlopen(url + "/ping", timeout=2) as r:
                        if r.status == 200:
                            break
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"mlflow models serve did not start:\n{log.read_text()[-3000:]}")
                time.sleep(0.5)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


def run_load(url: str, model: Any, images: np.ndarray, *, requests: int, concurrency: int, batch: int) -> dict[str, Any]:
    """The burst against ``url`` with its checks, latencies and the ratio to the in-process ceiling."""
    rng = np.random.default_rng(0)
    batches = [images[rng.choice(len(images), size=batch, replace=False)] for _ in range(requests)]
    expected, ceiling = in_process(model, batches)
    answers, wall = burst(url, batches, concurrency)
    served = requests * batch / wall
    return {
        "requests": requests, "concurrency": concurrency, "batch": batch,
        **check(answers, expected),
        **percentiles([a[2] for a in answers]),
        "requests_per_s": round(requests / wall, 2),
        "images_per_s": round(served, 1),
        "in_process_images_per_s": round(ceiling, 1),
        "ratio": round(served / ceiling, 3),
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-uri", required=True, help="the model to load in process (and to serve without --url)")
    p.add_argument("--url", default=None, help="a running server's base URL (default: start `mlflow models serve`)")
    p.add_argument("--images", type=Path, required=True, help="an .npz with 'x' uint8 [N,H,W,3] (e.g. data/prepared/test.npz)")
    p.add_argument("--requests", type=int, default=64, help="requests in the burst (default 64)")
    p.add_argument("--concurrency", type=int, default=8, help="clients sending at once (default 8)")
    p.add_argument("--batch", type=int, default=4, help="images per request (default 4)")
    p.add_argument("--workers", type=int, default=2, help="server workers when this script starts it (default 2)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/serving_load_cpu.json"), help="JSON to write")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import mlflow.pyfunc

    with np.load(args.images) as z:
        images = z["x"]
    model = mlflow.pyfunc.load_model(args.model_uri)
    with contextlib.ExitStack() as stack:
        url = args.url or stack.enter_context(serving(args.model_uri, args.workers, Path(tempfile.gettempdir()) / "serving_load.log"))
        row = run_load(url, model, images, requests=args.requests, concurrency=args.concurrency, batch=args.batch)
    result = {"machine": f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
              "model_uri": args.model_uri, "workers": None if args.url else args.workers, **row}
    cols = ("requests", "concurrency", "batch", "errors", "wrong", "p50_ms", "p90_ms", "p99_ms", "max_ms",
            "images_per_s", "in_process_images_per_s", "ratio")
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    print("| " + " | ".join(str(row[c]) for c in cols) + " |")
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0 if row["errors"] == 0 and row["wrong"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
