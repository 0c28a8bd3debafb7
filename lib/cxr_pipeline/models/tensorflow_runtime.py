"""The first import of TensorFlow in a process, without its start-up notices on the console.

As its libraries load, TensorFlow 2.21 writes two INFO notices per process to stderr: absl's
"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR" and
"oneDNN custom operations are on ...", each twice. They come before ``TF_CPP_MIN_LOG_LEVEL``
takes effect (tensorflow/tensorflow#100442), so that setting no longer hides them. A Spark job
showed eight such lines, two from each Python worker, before its own output.

:func:`import_tensorflow` imports TensorFlow with the process's stderr (file descriptor 2, where
the native code writes) caught, and writes back every caught line except those notices. Errors and
warnings that TensorFlow writes while loading still reach the console. Where ``TF_CPP_MIN_LOG_LEVEL``
is unset it becomes 1, so TensorFlow's later INFO lines (its CPU instruction notice) stay off too;
``TF_CPP_MIN_LOG_LEVEL=0`` asks for every INFO line, and then nothing is filtered.

>>> tf = import_tensorflow()  # doctest: +SKIP
>>> tf.__name__  # doctest: +SKIP
'tensorflow'
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import threading
from collections.abc import Iterable, Iterator

START_UP_NOTICES = (
    "All log messages before absl::InitializeLog() is called are written to STDERR",
    "oneDNN custom operations are on",
)
_IMPORT_LOCK = threading.Lock()


def import_tensorflow():
    """The ``tensorflow`` module, imported on first use with its start-up notices left out of stderr."""
    with _IMPORT_LOCK:  # one thread at a time moves file descriptor 2
        if "tensorflow" not in sys.modules:
            os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # no INFO lines once TensorFlow's logging is up
            if os.environ["TF_CPP_MIN_LOG_LEVEL"].strip() != "0":
                with stderr_without(START_UP_NOTICES):
                    import tensorflow
    import tensorflow  # also waits for an import another thread has started without this function

    return tensorflow


@contextlib.contextmanager
def stderr_without(notices: Iterable[str]) -> Iterator[None]:
    """Catch what this process writes to file descriptor 2; afterwards write back the lines holding none of ``notices``.

    The lines come back in their order, after the block ends. A line from another thread during the
    block is delayed, never lost.
    """
    notices = tuple(notices)
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr at all (a daemon with descriptor 2 closed): nothing to keep clean
        yield
        return
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            kept = [line for line in caught if not any(n.encode() in line for n in notices)]
            rest = b"".join(kept)
            while rest:
                rest = rest[os.write(2, rest) :]
