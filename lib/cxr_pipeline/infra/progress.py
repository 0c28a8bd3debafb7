"""Progress bars for long Spark stages, counted in the unit a person cares about (images).

Spark's own console bar counts tasks and fights with log lines; the featurizer instead counts
images in an accumulator (``FeaturizerStats.images``) that the driver sees grow as tasks finish.
:func:`images_bar` shows it with tqdm on stderr while a block runs (nothing when stderr is not a
terminal, e.g. under CI or in a log file).
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def images_bar(done: Callable[[], float], total: int, desc: str, interval: float = 0.5) -> Iterator[None]:
    """While the block runs, a bar of ``done()`` out of ``total`` images, refreshed every ``interval`` s."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit="img", file=sys.stderr, disable=None, dynamic_ncols=True)
    stop = threading.Event()

    def follow() -> None:
        while not stop.wait(interval):
            bar.n = min(total, int(done()))
            bar.refresh()

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    try:
        yield
        bar.n = min(total, int(done()))
        bar.refresh()
    finally:
        stop.set()
        thread.join()
        bar.close()
