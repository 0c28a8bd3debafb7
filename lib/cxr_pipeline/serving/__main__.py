"""``python -m cxr_pipeline.serving --model RUN``: serve a saved model under uvicorn.

The model is loaded once per worker process at start-up. Host, port, upload
limit, load limits and upload keeping come from the ``serving`` section of the
config (``--conf-env``, ``--conf FILE``, ``--set serving.port=8080``) or the flags.

Binding to anything but a loopback address needs an API token (the
``CXR_SERVE_API_TOKEN`` environment variable or ``--api-token-file``; clients
send ``Authorization: Bearer <token>``) or an explicit ``--insecure``.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import sys
from pathlib import Path

from cxr_pipeline.cli import Command, Job, UsageError, add_config_options, run

ENV_MODEL = "CXR_SERVE_MODEL"
ENV_CONFIG = "CXR_SERVE_CONFIG"
ENV_TOKEN = "CXR_SERVE_API_TOKEN"
MIN_TOKEN_CHARS = 16


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m cxr_pipeline.serving",
        description="Serve a trained chest X-ray model: upload page at /, JSON at POST /predict, "
        "GET /health, OpenAPI at /openapi.json.",
    )
    parser.add_argument(
        "--model",
        required=True,
        help="run folder of jobs/train_featurizer.py or jobs/train_cnn.py (path or URI), a .keras file, "
        "or a registered model models:/NAME@ALIAS (MLflow, tracking.* settings)",
    )
    parser.add_argument("--host", help="interface to bind (default: serving.host, loopback)")
    parser.add_argument("--port", type=int, help="port (default: serving.port)")
    parser.add_argument(
        "--workers", type=int, default=1, help="uvicorn worker processes, each loads the model (default 1)"
    )
    parser.add_argument("--max-upload-mb", type=float, help="reject larger files (default serving.max_upload_mb)")
    parser.add_argument(
        "--api-token-file",
        type=Path,
        help=f"file holding the API token clients must send as 'Authorization: Bearer <token>' "
        f"(default: the {ENV_TOKEN} environment variable; none = no token on loopback)",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="allow a non-loopback --host without an API token (only behind an authenticating proxy)",
    )
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    add_config_options(parser, spark=False, verbose=False)  # --log-level sets the server's verbosity
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def app_from_env():
    """uvicorn factory for ``--workers N``: each worker process builds its own app."""
    from .app import create_app

    return create_app(
        os.environ[ENV_MODEL], config=json.loads(os.environ[ENV_CONFIG]), api_token=os.environ.get(ENV_TOKEN) or None
    )


def is_loopback(host: str) -> bool:
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def api_token(args: argparse.Namespace) -> str | None:
    """The token from --api-token-file or the environment; UsageError with a sentence if it is unusable."""
    if args.api_token_file:
        try:
            token = args.api_token_file.read_text().strip()
        except OSError as err:
            raise UsageError(f"cannot read --api-token-file: {err}") from None
    else:
        token = os.environ.get(ENV_TOKEN, "").strip()
    if token and len(token) < MIN_TOKEN_CHARS:
        raise UsageError(
            f"the API token is {len(token)} characters; use at least {MIN_TOKEN_CHARS}, e.g. "
            "python -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )
    return token or None


def check_exposure(host: str, token: str | None, insecure: bool) -> None:
    """Refuse a non-loopback bind without a token unless --insecure says a proxy guards it."""
    if is_loopback(host) or token or insecure:
        return
    raise UsageError(
        f"refusing to serve on {host}: a non-loopback address needs an API token. Set {ENV_TOKEN} (or "
        "--api-token-file FILE) and have clients send 'Authorization: Bearer <token>', or pass --insecure "
        "if an authenticating proxy in front of the service guards it. Also add the name clients use to "
        "serving.allowed_hosts."
    )


def serve(job: Job) -> int:
    args, config = job.args, job.config
    serving = dict(config.get("serving") or {})
    serving.update(
        {
            key: value
            for key, value in (("host", args.host), ("port", args.port), ("max_upload_mb", args.max_upload_mb))
            if value is not None
        }
    )
    config["serving"] = serving
    from .. import tracking
    from ..cli import missing_on_this_machine
    from .settings import ServingSettings

    missing = missing_on_this_machine(args.model, config)
    if missing:
        raise UsageError(f"cannot serve {args.model}: {missing}")
    model = tracking.resolve_model(args.model, config)  # models:/NAME@ALIAS -> that version's run folder
    settings = ServingSettings.from_config(config)
    token = api_token(args)
    check_exposure(settings.host, token, args.insecure)
    host, port = settings.host, int(settings.port)
    if not is_loopback(host) and not ({"*"} & set(settings.allowed_hosts)):
        print(
            f"note: only Host names in serving.allowed_hosts are answered ({', '.join(settings.allowed_hosts)})",
            file=sys.stderr,
        )

    import uvicorn

    from .app import create_app

    if args.workers > 1:
        os.environ[ENV_MODEL] = model
        os.environ[ENV_CONFIG] = json.dumps(config, default=str)
        if token:
            os.environ[ENV_TOKEN] = token
        uvicorn.run(
            "cxr_pipeline.serving.__main__:app_from_env",
            factory=True,
            host=host,
            port=port,
            workers=args.workers,
            log_level=args.log_level,
        )
        return 0
    app = create_app(model, config=config, api_token=token)
    print(
        f"serving {app.state.backend.info.model_id} ({app.state.backend.info.name}) on http://{host}:{port}/",
        file=sys.stderr,
    )
    uvicorn.run(app, host=host, port=port, log_level=args.log_level)
    return 0


def _known_errors() -> tuple[type[BaseException], ...]:
    from .backends import ModelLoadError

    return (ModelLoadError, FileNotFoundError, ValueError)


COMMAND = Command("serving", build_parser, serve, errors=_known_errors)


def main(argv: list[str] | None = None) -> int:
    return run(COMMAND, argv)


if __name__ == "__main__":
    sys.exit(main())
