"""``python -m cxr_pipeline.serving --model RUN``: serve a saved model under uvicorn.

The model is loaded once per worker process at start-up. Host, port, upload
limit and upload keeping come from the ``serving`` section of the config
(``--conf-env``, ``--conf FILE``, ``--set serving.port=8080``) or the flags.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from cxr_pipeline.config import ConfigError, load_config

ENV_MODEL = "CXR_SERVE_MODEL"
ENV_CONFIG = "CXR_SERVE_CONFIG"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m cxr_pipeline.serving",
        description="Serve a trained chest X-ray model: upload page at /, JSON at POST /predict, "
        "GET /health, OpenAPI at /openapi.json.",
    )
    parser.add_argument("--model", required=True,
                        help="run folder of jobs/train_featurizer.py or jobs/train_cnn.py (path or URI), or a .keras file")
    parser.add_argument("--host", help="interface to bind (default serving.host, 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default serving.port, 8000)")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes, each loads the model (default 1)")
    parser.add_argument("--max-upload-mb", type=float, help="reject larger files (default serving.max_upload_mb)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    parser.add_argument("--conf-env", default=None, help="config environment: local | standalone | yarn")
    parser.add_argument("--conf", action="append", default=[], help="extra YAML config file (repeatable)")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="SECTION.KEY=VALUE",
                        help="config override (repeatable), e.g. serving.keep_uploads=true")
    return parser.parse_args(argv)


def app_from_env():
    """uvicorn factory for ``--workers N``: each worker process builds its own app."""
    from .app import create_app

    return create_app(os.environ[ENV_MODEL], config=json.loads(os.environ.get(ENV_CONFIG, "{}")))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config: dict[str, Any] = load_config(args.conf_env, args.conf, args.overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    serving = dict(config.get("serving") or {})
    if args.max_upload_mb is not None:
        serving["max_upload_mb"] = args.max_upload_mb
    config["serving"] = serving
    host = args.host or serving.get("host") or "127.0.0.1"
    port = args.port or int(serving.get("port") or 8000)

    import uvicorn

    from .app import create_app
    from .backends import ModelLoadError

    if args.workers > 1:
        os.environ[ENV_MODEL] = args.model
        os.environ[ENV_CONFIG] = json.dumps(config, default=str)
        uvicorn.run("cxr_pipeline.serving.__main__:app_from_env", factory=True, host=host, port=port,
                    workers=args.workers, log_level=args.log_level)
        return 0
    try:
        app = create_app(args.model, config=config)
    except (ModelLoadError, FileNotFoundError, ValueError) as err:
        print(f"cannot serve {args.model}: {err}", file=sys.stderr)
        return 2
    print(f"serving {app.state.backend.info.model_id} ({app.state.backend.info.name}) on http://{host}:{port}/",
          file=sys.stderr)
    uvicorn.run(app, host=host, port=port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
