"""ASGI middleware in front of the app: the Host check, the API token, the upload body (413, 408, 503) and
admission (503). A request meets them in that order."""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass

from fastapi.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .validation import UploadRejected, describe_size, too_large

# Room for the multipart envelope (boundaries, part headers) around the file itself.
MULTIPART_OVERHEAD = 64 * 1024
UPLOAD_PATHS = ("/", "/predict")
DRAIN_LIMIT_FACTOR = 8
# Reachable without the API token: liveness probes (it names the model id and the load, nothing else).
OPEN_PATHS = ("/health",)


def host_name(header: str) -> str:
    """The name part of a Host header: ``[::1]:8000`` -> ``::1``, ``Example.org.:80`` -> ``example.org``."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    if header.count(":") == 1:
        header = header.split(":", 1)[0]
    return header.rstrip(".")


class HostCheck:
    """ASGI middleware: only requests whose Host names a served host get through.

    A DNS-rebinding page (evil.example resolving to 127.0.0.1) sends ``Host:
    evil.example``: refused, so the page cannot use the loopback service.
    """

    def __init__(self, app: ASGIApp, allowed: list[str]):
        self.app = app
        self.any = "*" in allowed
        self.allowed = {host_name(str(h)) for h in allowed}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.any:
            await self.app(scope, receive, send)
            return
        header = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
        if host_name(header) in self.allowed:
            await self.app(scope, receive, send)
            return
        rejection = UploadRejected(
            400,
            "host_not_allowed",
            f"Host {header!r} is not served here; the service "
            "answers the names in serving.allowed_hosts (add yours there).",
        )
        await JSONResponse(rejection.as_json(), status_code=400)(scope, receive, send)


class BearerToken:
    """ASGI middleware: every path but ``/health`` needs ``Authorization: Bearer <token>``."""

    def __init__(self, app: ASGIApp, token: str):
        self.app, self.expected = app, f"Bearer {token}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"authorization", b"")
        if hmac.compare_digest(given, self.expected):  # constant time: the compare leaks no prefix length
            await self.app(scope, receive, send)
            return
        rejection = UploadRejected(
            401, "unauthorized", "This service needs an API token: send the header " "'Authorization: Bearer <token>'."
        )
        await JSONResponse(rejection.as_json(), status_code=401, headers={"WWW-Authenticate": "Bearer"})(
            scope, receive, send
        )


@dataclass
class LoadCounters:
    """What /health reports about the load; changed on the event loop only (no lock needed)."""

    receiving: int = 0
    peak_receiving: int = 0
    in_flight: int = 0
    peak_in_flight: int = 0
    heatmaps_in_flight: int = 0
    busy_rejections: int = 0
    slow_rejections: int = 0


def is_upload(scope: Scope) -> bool:
    return scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in UPLOAD_PATHS


class BodyTooSlow(Exception):
    """The request body fell behind its :class:`BodyPace`."""


@dataclass(frozen=True)
class BodyPace:
    """The pace a request body keeps: after ``grace_s``, at least ``min_rate`` bytes/s on average.

    Each byte received moves the body's deadline ``1 / min_rate`` s further: a client that keeps
    sending keeps its place, one that stalls loses it once its average falls below ``min_rate``.
    """

    grace_s: float
    min_rate: float  # bytes per second


class PacedReceive:
    """``receive`` under a :class:`BodyPace`: raises :class:`BodyTooSlow` once the body falls behind."""

    def __init__(self, receive: Receive, pace: BodyPace):
        self.receive, self.pace = receive, pace
        self.start = time.monotonic()
        self.received = 0

    async def __call__(self) -> Message:
        left = self.start + self.pace.grace_s + self.received / self.pace.min_rate - time.monotonic()
        if left <= 0:
            raise BodyTooSlow
        try:
            message = await asyncio.wait_for(self.receive(), left)
        except TimeoutError:
            raise BodyTooSlow from None
        self.received += len(message.get("body", b""))
        return message

    def too_slow(self) -> UploadRejected:
        seconds = time.monotonic() - self.start
        return UploadRejected(
            408,
            "upload_too_slow",
            f"The upload arrived too slowly ({describe_size(self.received)} in {seconds:.0f} s; the service "
            f"needs {self.pace.min_rate / 1024:g} kB/s after the first {self.pace.grace_s:g} s): "
            "send it again over a faster connection.",
        )


class ClientGone(Exception):
    """The client disconnected before its body was in."""


class BodyReceiver:
    """ASGI middleware: an upload's whole body is read, at a minimum pace and within the size limit,
    before the app (and admission) sees the request.

    * a Content-Length over ``max_body`` gets 413 at once; a chunked body is counted as it arrives;
    * at most ``limit`` bodies arrive at once (each is held in memory); the next upload gets 503;
    * a body that falls behind ``pace`` gets 408 and its connection is closed, so a stalled or
      trickling client gives up its place within ``pace.grace_s`` of stalling (at the start).
    The body then reaches the app as it arrived, one message per piece.
    """

    def __init__(
        self,
        app: ASGIApp,
        limit: int,
        pace: BodyPace,
        max_body: int,
        max_file: int,
        retry_after_s: int,
        counters: LoadCounters,
        reject: Callable[[Scope, UploadRejected], Response],
    ):
        self.app, self.limit, self.pace, self.counters, self.reject = app, limit, pace, counters, reject
        self.max_body, self.max_file, self.retry_after_s = max_body, max_file, retry_after_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not is_upload(scope):
            await self.app(scope, receive, send)
            return
        paced = PacedReceive(receive, self.pace)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            await self.refuse_unread(scope, paced, send, too_large(int(declared), self.max_file))
            return
        counters = self.counters
        if counters.receiving >= self.limit:
            counters.busy_rejections += 1
            rejection = busy(f"{counters.receiving} uploads are arriving", self.retry_after_s)
            await self.refuse_unread(scope, paced, send, rejection)
            return
        counters.receiving += 1
        counters.peak_receiving = max(counters.peak_receiving, counters.receiving)
        try:
            body: list[Message] | UploadRejected = await self.read_body(paced)
        except UploadRejected as rejection:
            body = rejection
        except ClientGone:
            return
        finally:
            counters.receiving -= 1
        if isinstance(body, UploadRejected):
            await self.answer(scope, send, body, close=True)
            return
        await self.app(scope, replay(body, receive), send)

    async def read_body(self, paced: PacedReceive) -> list[Message]:
        """The body's messages; :class:`UploadRejected` (408, 413) or :class:`ClientGone` if it cannot be had."""
        messages, size = [], 0
        while True:
            try:
                message = await paced()
            except BodyTooSlow:
                self.counters.slow_rejections += 1
                raise paced.too_slow() from None
            if message["type"] != "http.request":
                raise ClientGone
            size += len(message.get("body", b""))
            if size > self.max_body:
                raise too_large(None, self.max_file)
            messages.append(message)
            if not message.get("more_body", False):
                return messages

    async def refuse_unread(self, scope: Scope, paced: PacedReceive, send: Send, rejection: UploadRejected) -> None:
        """Answer without keeping the body; the connection is closed unless the whole body could be drained."""
        drained = await drain(paced, limit=DRAIN_LIMIT_FACTOR * self.max_body)
        await self.answer(scope, send, rejection, close=not drained)

    async def answer(self, scope: Scope, send: Send, rejection: UploadRejected, close: bool) -> None:
        response = self.reject(scope, rejection)
        if close:  # the rest of the body is never read: the connection cannot carry another request
            response.headers["Connection"] = "close"
        await response(scope, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


def replay(body: list[Message], receive: Receive) -> Receive:
    """A ``receive`` that gives ``body`` (dropping each message as it goes), then the client's own."""

    async def replaying() -> Message:
        return body.pop(0) if body else await receive()

    return replaying


class Admission:
    """ASGI middleware: at most ``limit`` uploads in flight; the next one gets 503 + Retry-After at once.

    Placed after :class:`BodyReceiver`: an upload is counted once its whole body is in, so a slow
    body never holds a slot; the slot is held until the answer is written.
    """

    def __init__(
        self,
        app: ASGIApp,
        limit: int,
        retry_after_s: int,
        counters: LoadCounters,
        reject: Callable[[Scope, UploadRejected], Response],
    ):
        self.app, self.limit, self.retry_after_s, self.counters = app, limit, retry_after_s, counters
        self.reject = reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not is_upload(scope):
            await self.app(scope, receive, send)
            return
        counters = self.counters
        if counters.in_flight >= self.limit:
            counters.busy_rejections += 1
            rejection = busy(f"{counters.in_flight} uploads are in progress", self.retry_after_s)
            await self.reject(scope, rejection)(scope, receive, send)
            return
        counters.in_flight += 1
        counters.peak_in_flight = max(counters.peak_in_flight, counters.in_flight)
        try:
            await self.app(scope, receive, send)
        finally:
            counters.in_flight -= 1


def busy(reason: str, retry_after_s: int) -> UploadRejected:
    return UploadRejected(503, "busy", f"The service is busy ({reason}): try again in {retry_after_s} s.")


async def drain(receive: Receive, limit: int) -> bool:
    """Read (and drop) what the client is sending so it sees the answer rather than a reset
    connection. True once the body is all in; False past ``limit`` bytes, when the client
    left, or when a paced ``receive`` finds the body too slow."""
    seen = 0
    try:
        while seen <= limit:
            message = await receive()
            if message["type"] != "http.request":
                return False
            seen += len(message.get("body", b""))
            if not message.get("more_body", False):
                return True
    except BodyTooSlow:
        return False
    return False
