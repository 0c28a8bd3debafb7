"""Load test of the prediction service on loopback: several clients, a mix of good and bad uploads.

    PYTHONPATH=lib .venv/bin/python bench/bench_serving_load.py --model RUN [--clients 12 --duration 120]

Starts ``python -m cxr_pipeline.serving`` on 127.0.0.1 (a free port; its load limits
come from the config, change them with ``--set serving.max_active=4``), then runs
``--clients`` client threads for ``--duration`` seconds, at most ``--max-requests``
requests in all, and stops the service. Each client sends, in a seeded shuffled order:

  good        a sample-tree JPEG                          -> 200, probability = batch scoring
  png16       the same X-ray as a 16-bit grayscale PNG    -> 200, probability = batch scoring
  huge16      one 7000x7000 16-bit PNG (49 Mpx, ~0.1 MB)  -> 200, probability = batch scoring
              (within the 60 Mpx guard: the decode-memory worst case)
  corrupt     a truncated JPEG / garbage after a JPEG header -> 422 corrupt_image
  not_image   text bytes named .jpeg                      -> 415 not_an_image
  too_large   random bytes over serving.max_upload_mb     -> 413 too_large

``--scenario stalled`` (issue 30): ``--stalled`` sockets (10) each send ``POST /predict`` headers
announcing 1 MB and 10 bytes of body, then stall; while they are open one client sends good
uploads one after another. Prints the normal uploads' answers and latency while the stalled
sockets were open, and when and how the stalled ones were answered (408 once they fall behind
serving.body_min_kb_s after serving.body_grace_s).

"Batch scoring" is the run's own ``predict_bytes`` (LocalClassifier / LocalCnnClassifier,
what ``cxr-predict-image`` uses; the serving tests tie it to ``jobs/predict.py``), computed
before the service starts; equal means within tests/tolerances.PROBABILITY_ATOL.
A 503 is a right answer for any kind while the service is saturated; the client then
waits the Retry-After seconds, as a well-behaved client does.

Prints requests sent, answers by status code, wrong answers (0 expected), 5xx other
than 503, p50/p95 latency, and the service's peak RSS (VmHWM) next to the bound its
settings imply. Only the machine itself is contacted; figures are printed, not asserted.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import random
import socket
import statistics
import sys
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from tolerances import PROBABILITY_ATOL  # noqa: E402

from cxr_pipeline.serving.launcher import HOST, get_json, multipart_image, peak_rss_mb, service_process  # noqa: E402

MIB = 1024 * 1024


@dataclass(frozen=True)
class Payload:
    kind: str
    body: bytes
    content_type: str
    status: int  # the right answer (503 is always right too)
    code: str | None = None  # the error code a 4xx must carry
    probability: float | None = None  # the batch scoring of the same bytes (good uploads)


@dataclass
class Tally:
    statuses: Counter = field(default_factory=Counter)
    by_kind: Counter = field(default_factory=Counter)
    latencies: dict = field(default_factory=lambda: defaultdict(list))
    wrong: list = field(default_factory=list)
    server_errors: int = 0
    connection_errors: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, payload: Payload, status: int, seconds: float, problem: str | None) -> None:
        with self.lock:
            self.statuses[status] += 1
            self.by_kind[payload.kind] += 1
            self.latencies["all"].append(seconds)
            self.latencies[payload.kind if status != 503 else "503"].append(seconds)
            if status >= 500 and status != 503:
                self.server_errors += 1
            if problem:
                self.wrong.append(f"{payload.kind}: {problem}")

    @property
    def sent(self) -> int:
        return sum(self.statuses.values()) + self.connection_errors


# ----------------------------------------------------------------------------
# Payloads


def sample_images(limit: int) -> list[Path]:
    from cxr_pipeline import paths

    images = sorted(paths.SAMPLE_TREE.rglob("*.jpeg"))
    if not images:
        raise SystemExit("no sample tree: run `make sample-data` first")
    return images[:limit]


def png16(jpeg: bytes, max_side: int = 1024) -> bytes:
    """The X-ray as a 16-bit grayscale PNG (what a modality export looks like), at most ``max_side`` px."""
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(jpeg)) as img:
        gray = img.convert("L")
    gray.thumbnail((max_side, max_side))
    wide = np.asarray(gray, dtype=np.uint16) * 257 + 3  # 0..65535 range, offset: windowing has work to do
    out = io.BytesIO()
    Image.fromarray(wide).save(out, format="PNG")
    return out.getvalue()


def huge_png16(side: int = 7000) -> bytes:
    """A smooth 16-bit gradient: tiny as a PNG, ``side``^2 pixels to decode."""
    import numpy as np
    from PIL import Image

    row = np.linspace(1000, 60000, side, dtype=np.float32).astype(np.uint16)
    out = io.BytesIO()
    Image.fromarray(np.broadcast_to(row, (side, side)).copy()).save(out, format="PNG")
    return out.getvalue()


def batch_scores(model: str, blobs: list[bytes]) -> list[float]:
    """The run's own batch API on the same bytes (loaded here, before the service starts)."""
    from cxr_pipeline.serving.backends import detect_kind

    if detect_kind(model) == "spark-lr":
        from cxr_pipeline.spark.classifier.model_export import LocalClassifier

        results = LocalClassifier.load(model).predict_bytes(blobs)
    else:
        from cxr_pipeline.cnn.predict import LocalCnnClassifier

        results = LocalCnnClassifier.load(model).predict_bytes(blobs)
    bad = [r["error"] for r in results if r["error"]]
    if bad:
        raise SystemExit(f"the batch scoring rejected a good payload: {bad}")
    return [float(r["probability"]) for r in results]


def build_payloads(model: str, n_images: int, max_upload_mb: float, seed: int) -> list[Payload]:
    import serving_support as bad

    images = [p.read_bytes() for p in sample_images(n_images)]
    wide = [png16(data) for data in images]
    huge = huge_png16()
    scores = batch_scores(model, images + wide + [huge])
    payloads = []

    def add(
        kind: str,
        data: bytes,
        status: int,
        code: str | None = None,
        probability: float | None = None,
        name: str = "upload.jpeg",
    ) -> None:
        body, content_type = multipart_image(data, name)
        payloads.append(Payload(kind, body, content_type, status, code, probability))

    for data, p in zip(images, scores[: len(images)]):
        add("good", data, 200, probability=p)
    for data, p in zip(wide, scores[len(images) :]):
        add("png16", data, 200, probability=p, name="upload.png")
    add("huge16", huge, 200, probability=scores[-1], name="upload.png")
    for data in images[:4]:
        add("corrupt", bad.truncated_jpeg(data), 422, "corrupt_image")
        add("corrupt", bad.corrupt_jpeg(data), 422, "corrupt_image")
    for _ in range(4):
        add("not_image", bad.not_an_image(), 415, "not_an_image")
    rng = random.Random(seed)
    for _ in range(2):
        add("too_large", rng.randbytes(int((max_upload_mb + 0.5) * MIB)), 413, "too_large")
    return payloads


# ----------------------------------------------------------------------------
# Clients


def check(payload: Payload, status: int, answer: dict) -> str | None:
    """None for a right answer, else what was wrong."""
    if status == 503:
        return None if answer.get("code") == "busy" else f"503 without code busy: {answer}"
    if status != payload.status:
        return f"status {status}, expected {payload.status}: {str(answer)[:200]}"
    if payload.code is not None and answer.get("code") != payload.code:
        return f"code {answer.get('code')!r}, expected {payload.code!r}"
    if payload.probability is not None and not abs(answer["probability"] - payload.probability) <= PROBABILITY_ATOL:
        return f"probability {answer['probability']!r}, batch scoring {payload.probability!r}"
    return None


def client(port: int, payloads: list[Payload], tally: Tally, deadline: float, budget: Budget, seed: int) -> None:
    order = list(payloads)
    random.Random(seed).shuffle(order)
    conn = http.client.HTTPConnection(HOST, port, timeout=120)
    i = 0
    while time.monotonic() < deadline and budget.take():
        payload = order[i % len(order)]
        i += 1
        start = time.perf_counter()
        try:
            conn.request("POST", "/predict", body=payload.body, headers={"Content-Type": payload.content_type})
            response = conn.getresponse()
            raw = response.read()
            retry_after = response.getheader("Retry-After")
        except (OSError, http.client.HTTPException) as err:
            with tally.lock:
                tally.connection_errors += 1
                tally.wrong.append(f"{payload.kind}: connection error {type(err).__name__}: {err}")
            conn.close()
            conn = http.client.HTTPConnection(HOST, port, timeout=120)
            continue
        elapsed = time.perf_counter() - start
        try:
            answer = json.loads(raw)
        except ValueError:
            answer = {"unparsed": raw[:200]}
        tally.record(payload, response.status, elapsed, check(payload, response.status, answer))
        if response.status == 503 and retry_after:
            time.sleep(min(float(retry_after), max(0.0, deadline - time.monotonic())))
    conn.close()


class Budget:
    """At most ``n`` requests across all clients."""

    def __init__(self, n: int):
        self.left, self.lock = n, threading.Lock()

    def take(self) -> bool:
        with self.lock:
            self.left -= 1
            return self.left >= 0


# ----------------------------------------------------------------------------
# Report


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def latency_row(name: str, values: list[float]) -> str:
    if not values:
        return f"| {name} | 0 | | |"
    ms = [v * 1000 for v in values]
    return f"| {name} | {len(ms)} | {statistics.median(ms):.0f} | {percentile(ms, 95):.0f} |"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ----------------------------------------------------------------------------
# Scenario: stalled uploads next to a working client


def open_stalled_upload(port: int, announced: int) -> socket.socket:
    """Headers announcing ``announced`` bytes, the start of a multipart image part and 10 bytes of it; then nothing."""
    sock = socket.create_connection((HOST, port), timeout=600)
    head = (
        f"POST /predict HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
        f"Content-Type: multipart/form-data; boundary=stall\r\nContent-Length: {announced}\r\n\r\n"
        '--stall\r\nContent-Disposition: form-data; name="file"; filename="x.jpeg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    )
    sock.sendall(head.encode() + b"\xff\xd8\xff\xe0" + bytes(6))
    return sock


def await_answer(sock: socket.socket, opened: float) -> tuple[int | str, float, str]:
    """(status or error name, seconds from opening to the answer, error code) of one stalled socket."""
    try:
        response = http.client.HTTPResponse(sock)
        response.begin()
        body = response.read()
        code = json.loads(body).get("code", "") if body else ""
        return response.status, time.monotonic() - opened, code
    except (OSError, http.client.HTTPException, ValueError):
        return "no answer", time.monotonic() - opened, "(the bench hung up)"
    finally:
        sock.close()


def stalled_scenario(port: int, n_stalled: int, image: bytes, limit_s: float) -> None:
    body, content_type = multipart_image(image, "upload.jpeg")
    opened = time.monotonic()
    sockets = [open_stalled_upload(port, 1_000_000) for _ in range(n_stalled)]
    give_up = opened + 60
    while (load := get_json(port, "/health")[1]["load"]).get("receiving", 0) + load["in_flight"] < n_stalled:
        if time.monotonic() > give_up:
            raise SystemExit(f"the {n_stalled} stalled uploads never all reached the service: {load}")
        time.sleep(0.05)
    arrived = time.monotonic() - opened
    with ThreadPoolExecutor(n_stalled) as pool:
        answers = [pool.submit(await_answer, sock, opened) for sock in sockets]
        statuses: Counter = Counter()
        latencies: list[float] = []
        first: tuple[int, float] | None = None
        conn = http.client.HTTPConnection(HOST, port, timeout=120)
        deadline = opened + limit_s
        while not all(a.done() for a in answers) and time.monotonic() < deadline:
            start = time.perf_counter()
            conn.request("POST", "/predict", body=body, headers={"Content-Type": content_type})
            response = conn.getresponse()
            response.read()
            elapsed = time.perf_counter() - start
            statuses[response.status] += 1
            latencies.append(elapsed)
            first = first or (response.status, elapsed)
            if response.status == 503:  # a well-behaved client waits as told
                time.sleep(float(response.getheader("Retry-After") or 1))
        conn.close()
        for sock, answer in zip(sockets, answers):
            if not answer.done():  # still unanswered at the time limit: the bench hangs up
                sock.shutdown(socket.SHUT_RDWR)
        stalled = [a.result() for a in answers]
    health = get_json(port, "/health")[1]["load"]
    waited = sorted(t for _, t, _ in stalled)
    outcomes = Counter(f"{status} {code}".strip() for status, _, code in stalled)
    print(f"\n{n_stalled} stalled uploads (1 MB announced, 10 bytes sent) + 1 client sending good uploads, loopback\n")
    print("| figure | value |\n|---|---|")
    print(f"| stalled sockets held by the service after | {arrived * 1000:.0f} ms |")
    if first:
        print(f"| first normal upload while they were open | {first[0]} in {first[1] * 1000:.0f} ms |")
    print(f"| normal uploads while they were open | {', '.join(f'{s}: {n}' for s, n in sorted(statuses.items()))} |")
    if latencies:
        ms = [v * 1000 for v in latencies]
        print(f"| normal upload p50 / p95 | {statistics.median(ms):.0f} / {percentile(ms, 95):.0f} ms |")
    print(f"| stalled sockets answered | {', '.join(f'{o}: {n}' for o, n in sorted(outcomes.items()))} |")
    print(f"| stalled answered after (min / max) | {waited[0]:.1f} / {waited[-1]:.1f} s |")
    print(
        f"| service counters | peak receiving {health.get('peak_receiving', 'n/a')}, peak in flight "
        f"{health['peak_in_flight']}, 408s {health.get('slow_rejections', 'n/a')}, 503s {health['busy_rejections']} |"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="run folder (train_featurizer or train_cnn) to serve")
    parser.add_argument(
        "--scenario",
        choices=("mix", "stalled"),
        default="mix",
        help="mix: the client mix above (default); stalled: stalled uploads next to a working client",
    )
    parser.add_argument("--stalled", type=int, default=10, help="stalled sockets in --scenario stalled (default 10)")
    parser.add_argument("--clients", type=int, default=12, help="client threads (default 12)")
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of load (default 120)")
    parser.add_argument("--max-requests", type=int, default=20000, help="stop after this many requests (default 20000)")
    parser.add_argument("--images", type=int, default=8, help="distinct sample X-rays used (default 8)")
    parser.add_argument(
        "--max-upload-mb",
        type=float,
        default=2.0,
        help="the service's upload limit; over-limit payloads are 0.5 MB above it (default 2)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        dest="overrides",
        metavar="serving.KEY=VALUE",
        help="config override for the service (repeatable), e.g. serving.max_queued=4",
    )
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--startup-timeout", type=float, default=180.0)
    args = parser.parse_args(argv)
    if args.clients < 1 or args.duration <= 0 or args.max_requests < 1 or args.stalled < 1:
        parser.error("--clients, --duration, --max-requests and --stalled must be positive")
    if args.scenario == "stalled":
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
        extra = [arg for override in args.overrides for arg in ("--set", override)]
        with service_process(args.model, extra, timeout=args.startup_timeout, env=env) as (port, _health, _server):
            stalled_scenario(port, args.stalled, sample_images(1)[0].read_bytes(), args.duration)
        return 0

    payloads = build_payloads(args.model, args.images, args.max_upload_mb, args.seed)
    kinds = Counter(p.kind for p in payloads)
    print(f"payloads: {dict(kinds)} (largest {max(len(p.body) for p in payloads) / MIB:.1f} MB)")
    extra = ["--max-upload-mb", str(args.max_upload_mb)]
    for override in args.overrides:
        extra += ["--set", override]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    with service_process(args.model, extra, timeout=args.startup_timeout, env=env) as (port, health, server):
        load = health["load"]
        start_rss = rss_mb(server.pid)
        print(
            f"service: {health['model']['model_id']} ({health['model']['name']}), max_active {load['max_active']}, "
            f"max_queued {load['max_queued']}, max_batch {health['batching']['max_batch']}; "
            f"RSS after start-up {start_rss:.0f} MB"
        )
        tally, budget = Tally(), Budget(args.max_requests)
        started = time.monotonic()
        deadline = started + args.duration
        with ThreadPoolExecutor(args.clients) as pool:
            for i in range(args.clients):
                pool.submit(client, port, payloads, tally, deadline, budget, args.seed + i)
        wall = time.monotonic() - started
        after = get_json(port, "/health")[1]
        peak = peak_rss_mb(server.pid)

    print(f"\n{args.clients} clients, {wall:.0f} s, loopback\n")
    print("| figure | value |\n|---|---|")
    print(f"| requests sent | {tally.sent} ({tally.sent / wall:.1f}/s) |")
    print(f"| by kind | {', '.join(f'{k} {v}' for k, v in sorted(tally.by_kind.items()))} |")
    print(f"| answers by status | {', '.join(f'{s}: {n}' for s, n in sorted(tally.statuses.items()))} |")
    print(f"| wrong answers | {len(tally.wrong)} |")
    print(f"| 5xx other than 503 | {tally.server_errors} |")
    print(f"| connection errors | {tally.connection_errors} |")
    admitted = load["max_active"] + load["max_queued"]
    print(f"| peak in flight (admitted) | {after['load']['peak_in_flight']} of {admitted} |")
    print(
        f"| model calls / images scored | {after['batching']['model_calls']} / {after['batching']['images_scored']} "
        f"(largest batch {after['batching']['largest_batch']}) |"
    )
    print(f"| service RSS after start-up / peak (VmHWM) | {start_rss:.0f} MB / {peak:.0f} MB |")
    print("\n| latency | n | p50 ms | p95 ms |\n|---|---|---|---|")
    for name in ("all", "good", "png16", "huge16", "corrupt", "not_image", "too_large", "503"):
        print(latency_row(name, tally.latencies.get(name, [])))
    for problem in tally.wrong[:20]:
        print(f"WRONG {problem}")
    return 1 if tally.wrong or tally.server_errors else 0


if __name__ == "__main__":
    sys.exit(main())
