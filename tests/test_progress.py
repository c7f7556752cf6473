"""eeruntime.progress.bar: a redrawn tqdm bar on a terminal, a few whole lines in a log."""

import io

import pytest

from eeruntime import progress


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


class Tty(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture
def clock(monkeypatch):
    c = FakeClock()
    # every tqdm instance takes its clock from tqdm.std's module-level time()
    monkeypatch.setattr("tqdm.std.time", c)
    return c


def _run(out, steps, dt, clock, interval=15.0, postfix=True):
    b = progress.bar(range(steps), total=steps, desc="work", file=out, log_interval=interval)
    for i in b:
        clock.t += dt
        if postfix:
            b.set_postfix(loss=i)  # tqdm redraws on every set_postfix by default
    return out.getvalue()


def test_log_bar_prints_one_line_per_interval_and_the_end(clock):
    # 1000 steps of 0.1 s: 100 s, so lines at 15, 30, ... 90 s and one for the end
    text = _run(io.StringIO(), 1000, 0.1, clock)
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert 6 <= len(lines) <= 8, lines
    assert all(line.startswith("work:") for line in lines)
    assert "1000/1000" in lines[-1]


def test_short_loop_in_a_log_is_silent(clock):
    assert _run(io.StringIO(), 500, 0.001, clock) == ""  # 0.5 s, under one interval


def test_terminal_gets_the_redrawn_bar(monkeypatch):
    monkeypatch.delenv("EERUNTIME_PROGRESS", raising=False)
    out = Tty()
    b = progress.bar(range(50), total=50, desc="tty", file=out)
    assert not isinstance(b, progress.LogBar)
    list(b)
    assert "\r" in out.getvalue()  # redrawn in place


def test_disabled_and_env_switches(monkeypatch):
    out = Tty()
    b = progress.bar(range(3), enabled=False, file=out)
    b.set_postfix(x=1)  # every tqdm method still works
    assert list(b) == [0, 1, 2] and out.getvalue() == ""
    monkeypatch.setenv("EERUNTIME_PROGRESS", "0")
    assert list(progress.bar(range(3), file=out)) == [0, 1, 2] and out.getvalue() == ""
    monkeypatch.setenv("EERUNTIME_PROGRESS", "1")
    assert not isinstance(progress.bar(range(3), file=io.StringIO()), progress.LogBar)


def test_every_bar_of_the_package_goes_through_the_helper():
    import pathlib

    import eeruntime

    root = pathlib.Path(eeruntime.__file__).parent
    users = [
        p.relative_to(root).as_posix()
        for p in root.rglob("*.py")
        if "import tqdm" in p.read_text() or "from tqdm" in p.read_text()
    ]
    assert users == ["progress.py"], users
