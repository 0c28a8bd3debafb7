"""The one way every entry point starts: ``sys.exit(run(COMMAND))``, after the pyspark-example-project's
``start_spark()``.

In order: the command's parser reads the arguments (its own and the shared config options,
:func:`~cxr_pipeline.cli.options.add_config_options`); logging is set up; the config is loaded (files, ``--set``,
the command's shortcuts); storage and run folders are configured once; the command's body runs with a
:class:`Job`, whose Spark session, when the command has one, starts on first use and stops when the body returns.
A known error ends the command with ``<name>: error: <message>`` on stderr and exit status 2 (or the status the
command gives that error); anything else is a bug and shows its traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import config as cfg
from .options import configure_logging, resolve_config

USAGE_ERROR = 2  # as argparse exits on a bad option


class UsageError(Exception):
    """Options that cannot go together, or a value out of range: the user's to fix."""


KNOWN_ERRORS: tuple[type[BaseException], ...] = (cfg.ConfigError, UsageError)  # every command's; commands add theirs


@dataclass(frozen=True)
class Command:
    """One entry point.

    ``parser`` builds its argument parser, shared options included (``add_config_options``); ``body`` does the
    work and returns the exit status. ``spark_app``: the Spark application name of a command that has a session.
    ``verbose_logs``: False where the command's own ``--verbose`` means something else (Keras's progress).
    ``errors()``: the exceptions that are the user's to fix (exit 2), imported when one is raised;
    ``exit_codes()``: those with a status of their own, most specific first. ``shortcuts(args)``:
    ``(section.key, value)`` pairs the command's options set (None = not given)."""

    name: str
    parser: Callable[[], argparse.ArgumentParser]
    body: Callable[[Job], int]
    spark_app: str | None = None
    verbose_logs: bool = True
    errors: Callable[[], tuple[type[BaseException], ...]] = tuple
    exit_codes: Callable[[], Mapping[type[BaseException], int]] = dict
    shortcuts: Callable[[argparse.Namespace], Sequence[tuple[str, Any]]] | None = None


@dataclass
class Job:
    """What a command's body works with: its arguments, the resolved config, when it started (``time.time()``),
    and its Spark session."""

    command: Command
    args: argparse.Namespace
    config: dict[str, Any] = field(default_factory=dict)
    started_at: float = field(default_factory=time.time)
    _session: Any = None

    @property
    def spark(self):
        """The command's SparkSession, built from the config on first use (``--master``, ``--verbose``)."""
        if self._session is None:
            if self.command.spark_app is None:
                raise RuntimeError(f"{self.command.name} has no Spark session: give its Command a spark_app")
            from ..spark.session import spark_session

            self._session = spark_session(
                self.config,
                app_name=self.command.spark_app,
                master=getattr(self.args, "master", None),
                verbose=self.verbose,
            )
        return self._session

    @property
    def verbose(self) -> bool:
        return self.command.verbose_logs and bool(getattr(self.args, "verbose", False))

    def stop(self) -> None:
        if self._session is not None:
            self._session.stop()
            self._session = None


def configure_services(config: Mapping[str, Any]) -> None:
    """The config every command's storage and run folders use (once per command)."""
    from ..infra import run_folder, storage

    storage.configure(config)
    run_folder.configure(config)


def run(command: Command, argv: Sequence[str] | None = None) -> int:
    """Runs ``command`` on ``argv`` (None: the process's) and returns its exit status."""
    started = time.time()
    args = command.parser().parse_args(argv)
    for shared in ("conf_env", "conf", "set"):
        if not hasattr(args, shared):
            raise TypeError(f"{command.name}: its parser lacks the shared config options (add_config_options)")
    job = Job(command, args, started_at=started)
    configure_logging(job.verbose)
    try:
        job.config = resolve_config(args, command.shortcuts(args) if command.shortcuts else ())
        configure_services(job.config)
        return command.body(job)
    except Exception as exc:
        status = exit_status(command, exc)
        if status is None:
            raise
        if job.verbose:
            traceback.print_exc()
        print(f"{command.name}: error: {exc}", file=sys.stderr)
        return status
    finally:
        job.stop()


def exit_status(command: Command, error: BaseException) -> int | None:
    """The exit status of a command that stopped on ``error``; None for a bug (let it show its traceback)."""
    for kind, status in command.exit_codes().items():
        if isinstance(error, kind):
            return status
    return USAGE_ERROR if isinstance(error, KNOWN_ERRORS + tuple(command.errors())) else None
