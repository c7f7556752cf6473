"""The one progress bar every long loop of the package uses (training, calibration passes, scorer
fitting): tqdm on a terminal or in a notebook, a few whole lines in a log.

tqdm redraws its bar in place with carriage returns; written to a file or a pipe (CI, ``make demo
> log``) every redraw becomes a line of its own, hundreds of them. Off a terminal, :func:`bar`
therefore prints whole lines, at most one every ``log_interval`` seconds and a last one at the end
when an earlier one was printed: a loop shorter than ``log_interval`` prints nothing, a long one a
line every ``log_interval`` seconds. ``EERUNTIME_PROGRESS=0`` turns every bar off, ``=1`` forces
the terminal bar.
"""

from __future__ import annotations

import os
import sys
from typing import Iterable, Optional

from tqdm import tqdm as _std_tqdm

LOG_INTERVAL = 15.0  # seconds between two lines of a bar written to a log


class LogBar(_std_tqdm):
    """tqdm written as whole lines (no carriage returns, nothing cleared), for files and pipes."""

    monitor_interval = 0  # tqdm's monitor thread forces redraws after maxinterval; not in a log

    def __init__(self, *args, log_interval: float = LOG_INTERVAL, **kwargs):
        self._lines = 0
        self._last_line_n = None
        kwargs.update(
            mininterval=log_interval,
            delay=log_interval,
            miniters=1,
            leave=False,
            dynamic_ncols=False,
            ncols=kwargs.get("ncols") or 100,
            ascii=True,
        )
        super().__init__(*args, **kwargs)

    def display(self, msg=None, pos=None):
        if msg == "":  # tqdm clearing its line: a log has nothing to clear
            return False
        self.fp.write((self.__str__() if msg is None else msg) + "\n")
        self.fp.flush()
        self._lines += 1
        self._last_line_n = self.n
        return True

    def clear(self, nolock=False):
        pass

    # A new postfix or description shows on the next line; redrawing now would print one per call.
    def set_postfix(self, ordered_dict=None, refresh=True, **kwargs):
        super().set_postfix(ordered_dict, refresh=False, **kwargs)

    def set_postfix_str(self, s="", refresh=True):
        super().set_postfix_str(s, refresh=False)

    def set_description(self, desc=None, refresh=True):
        super().set_description(desc, refresh=False)

    def set_description_str(self, desc=None, refresh=True):
        super().set_description_str(desc, refresh=False)

    def moveto(self, n):
        pass

    def close(self):
        # A bar that printed during its run says how it ended; a short one stays silent.
        if not self.disable and self._lines and self._last_line_n != self.n:
            self.display()
        super().close()


def _in_notebook() -> bool:
    shell = getattr(sys.modules.get("IPython"), "get_ipython", lambda: None)()
    return type(shell).__name__ == "ZMQInteractiveShell"


def on_terminal(file=None) -> bool:
    """True when progress goes to a terminal (or a notebook), where tqdm can redraw in place."""
    forced = os.environ.get("EERUNTIME_PROGRESS", "").strip()
    if forced == "1":
        return True
    file = sys.stderr if file is None else file
    try:
        tty = bool(file.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        tty = False
    return tty or _in_notebook()


def bar(
    iterable: Optional[Iterable] = None,
    *,
    total=None,
    desc: Optional[str] = None,
    enabled: bool = True,
    file=None,
    log_interval: float = LOG_INTERVAL,
    **kwargs,
):
    """A tqdm bar over ``iterable`` (or a manual one with ``total``): redrawn in place on a terminal,
    whole lines at most every ``log_interval`` seconds elsewhere, nothing when ``enabled`` is false
    or ``EERUNTIME_PROGRESS=0``. Always a tqdm object (``set_postfix``, ``update``, ``close`` work
    in every mode)."""
    if os.environ.get("EERUNTIME_PROGRESS", "").strip() == "0":
        enabled = False
    kwargs.setdefault("leave", False)
    if not enabled:
        return _std_tqdm(iterable, total=total, desc=desc, disable=True, file=file, **kwargs)
    if on_terminal(file):
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, file=file, dynamic_ncols=True, **kwargs)
    return LogBar(iterable, total=total, desc=desc, file=file, log_interval=log_interval, **kwargs)
