"""The command line: the one runner every entry point starts through (``runner``), the options they share and
the console's logging (``options``), and the checks on the paths a user types (``inputs``).

Low floor: it imports the config; the services it starts for a command (storage, run folders, the Spark
session) it imports inside the functions that start them (tests/test_layout.py)."""

from .inputs import hdfs_twin, missing_on_this_machine
from .options import add_config_options, configure_logging, resolve_config
from .runner import Command, Job, UsageError, run

__all__ = [
    "Command",
    "Job",
    "UsageError",
    "add_config_options",
    "configure_logging",
    "hdfs_twin",
    "missing_on_this_machine",
    "resolve_config",
    "run",
]
