"""Benchmark the prediction service on loopback: single-image latency and throughput.

    PYTHONPATH=lib .venv/bin/python bench/bench_serving.py --model runs/demo [--image x.jpeg]

Starts ``python -m cxr_pipeline.serving`` on 127.0.0.1 (a free port), waits for
/health, then

1. sends ``--sequential`` requests one after another: median and p95 latency;
2. sends ``--requests`` requests from ``--concurrency`` client threads, stopping
   at ``--time-cap`` seconds: requests/s and latency under that bounded load.

Only the machine itself is contacted. Figures are printed, not asserted; on a
shared machine compare them only within one run.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from cxr_pipeline.serving.launcher import HOST, get_json, multipart_image, running_service  # noqa: E402


class Client:
    """One keep-alive HTTP connection (one per client thread)."""

    def __init__(self, port: int):
        self.port = port
        self.conn = http.client.HTTPConnection(HOST, port, timeout=120)

    def post(self, body: bytes, content_type: str) -> tuple[int, float, dict]:
        start = time.perf_counter()
        self.conn.request("POST", "/predict", body=body, headers={"Content-Type": content_type})
        response = self.conn.getresponse()
        payload = response.read()
        elapsed = time.perf_counter() - start
        return response.status, elapsed, json.loads(payload)


def get_health(port: int) -> dict:
    return get_json(port, "/health")[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def describe(latencies: list[float]) -> str:
    ms = [v * 1000 for v in latencies]
    return f"median {statistics.median(ms):7.1f} ms   p95 {percentile(ms, 95):7.1f} ms   (n={len(ms)})"


def default_image() -> Path:
    from cxr_pipeline import paths

    images = sorted(paths.SAMPLE_TREE.rglob("*.jpeg"))
    if not images:
        raise SystemExit("no --image given and no sample tree: run `make sample-data` or pass --image")
    return images[0]


def run_load(
    port: int, body: bytes, content_type: str, n_requests: int, concurrency: int, time_cap: float
) -> tuple[list[float], int, float]:
    deadline = time.monotonic() + time_cap
    counter = iter(range(n_requests))

    def worker(_: int) -> tuple[list[float], int]:
        client, latencies, errors = Client(port), [], 0
        for _ in counter:  # shared iterator: each request is taken once (next() on range iterators is atomic)
            if time.monotonic() > deadline:
                break
            status, elapsed, _payload = client.post(body, content_type)
            if status == 200:
                latencies.append(elapsed)
            else:
                errors += 1
        return latencies, errors

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(worker, range(concurrency)))
    wall = time.perf_counter() - start
    latencies = [v for lat, _ in results for v in lat]
    return latencies, sum(e for _, e in results), wall


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="run folder (train_featurizer or train_cnn) to serve")
    parser.add_argument("--image", type=Path, help="image to send (default: first image of the sample tree)")
    parser.add_argument("--sequential", type=int, default=30, help="one-at-a-time requests (default 30)")
    parser.add_argument("--requests", type=int, default=200, help="requests under load (default 200)")
    parser.add_argument("--concurrency", type=int, default=4, help="client threads under load (default 4)")
    parser.add_argument("--time-cap", type=float, default=60.0, help="stop the load phase after this many s")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes (default 1)")
    parser.add_argument(
        "--max-batch",
        type=int,
        default=None,
        help="serving.max_batch for the service (default: the config's); 1 = no micro-batching",
    )
    parser.add_argument("--startup-timeout", type=float, default=180.0)
    args = parser.parse_args(argv)

    image = args.image or default_image()
    data = image.read_bytes()
    body, content_type = multipart_image(data, image.name)
    extra = ["--workers", str(args.workers)]
    if args.max_batch is not None:
        extra += ["--set", f"serving.max_batch={args.max_batch}"]
    started = time.perf_counter()
    with running_service(args.model, extra, timeout=args.startup_timeout) as (port, health):
        startup = time.perf_counter() - started
        model = health["model"]
        max_batch = (health.get("batching") or {}).get("max_batch", "?")
        print(
            f"service: {model['model_id']} ({model['name']}), {args.workers} worker(s), "
            f"max_batch {max_batch}, ready in {startup:.1f} s"
        )
        print(f"image:   {image} ({len(data) / 1024:.0f} kB)")

        client = Client(port)
        status, _, first = client.post(body, content_type)  # warm the connection and any lazy state
        if status != 200:
            raise SystemExit(f"the service rejected the image: {first}")
        print(
            f"answer:  class {first['class']}, probability {first['probability']:.6f}, "
            f"threshold {first['threshold']:.4f}"
        )

        sequential = [client.post(body, content_type)[1] for _ in range(args.sequential)]
        print(f"single image, sequential:    {describe(sequential)}   -> {len(sequential) / sum(sequential):.1f} req/s")

        before = get_health(port).get("batching")
        latencies, errors, wall = run_load(port, body, content_type, args.requests, args.concurrency, args.time_cap)
        after = get_health(port).get("batching")
        if before and after and args.workers == 1:  # with several workers each has its own counters
            calls = after["model_calls"] - before["model_calls"]
            images = after["images_scored"] - before["images_scored"]
            print(
                f"under load: {images} images in {calls} model calls "
                f"({images / max(calls, 1):.2f} per call, largest batch {after['largest_batch']})"
            )
        capped = " (time cap reached)" if len(latencies) + errors < args.requests else ""
        print(
            f"load, concurrency {args.concurrency}:        {describe(latencies)}   "
            f"-> {len(latencies) / wall:.1f} req/s over {wall:.1f} s, {errors} errors{capped}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
