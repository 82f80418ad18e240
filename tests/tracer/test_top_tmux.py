"""`keyslot-trace top` in a real terminal (tmux): what the screen shows, keys, resize,
and that the terminal is restored after q and after Ctrl-C."""

import re
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
# tests/run installs tmux; only a bare `pytest` elsewhere may lack it. In CI a skip would hide a gap.
pytestmark = pytest.mark.skipif(shutil.which("tmux") is None and not os.environ.get("CI"),
                                reason="tmux is not installed (apt-get install tmux)")
PROMPT = "KST-PROMPT$"


class Pane:
    def __init__(self, tmp_path: Path, width: int, height: int):
        self.base = ["tmux", "-S", str(tmp_path / "tmux.sock")]
        self.tmux("new-session", "-d", "-x", str(width), "-y", str(height), "-s", "t",
                  "env -i PATH=/usr/bin:/bin TERM=xterm-256color HOME=/tmp bash --norc --noprofile")
        self.type(f"PS1='{PROMPT} '; cd {ROOT}; clear")
        self.wait_for(lambda s: s.strip().startswith(PROMPT))

    def tmux(self, *args) -> str:
        return subprocess.run([*self.base, *args], check=True, capture_output=True, text=True).stdout

    def type(self, text: str) -> None:
        self.tmux("send-keys", "-t", "t", "-l", text)
        self.tmux("send-keys", "-t", "t", "Enter")

    def key(self, *keys: str) -> None:
        self.tmux("send-keys", "-t", "t", *keys)

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", "t")

    def info(self, fmt: str) -> str:
        return self.tmux("display-message", "-p", "-t", "t", fmt).strip()

    def wait_for(self, ok, timeout: float = 20.0) -> str:
        end = time.monotonic() + timeout
        while True:
            s = self.screen()
            if ok(s):
                return s
            if time.monotonic() > end:
                pytest.fail(f"timed out waiting; the screen was:\n{s}")
            time.sleep(0.05)

    def run_top(self, *args: str) -> str:
        self.type(" ".join([sys.executable, "-m", "tracer.cli", "top", *args]))
        return self.wait_for(lambda s: "q quit" in s and self.info("#{alternate_on}") == "1")

    def assert_restored(self, rc: int) -> None:
        """Back at the prompt, out of the alternate screen, the tty cooked again, with exit status rc."""
        self.wait_for(lambda s: self.info("#{alternate_on}") == "0" and self.info("#{pane_current_command}") == "bash")
        self.type("echo rc=$?; stty -a | tr ' ' '\\n' | grep -x -e '-*icanon' -e '-*echo'")
        s = self.wait_for(lambda s: f"rc={rc}" in s and "echo\n" in s.split(f"rc={rc}")[1])
        assert "-icanon" not in s and "-echo\n" not in s and "icanon" in s

    def close(self):
        subprocess.run([*self.base, "kill-server"], capture_output=True)


@pytest.fixture
def pane(tmp_path, request):
    w, h = getattr(request, "param", (80, 24))
    p = Pane(tmp_path, w, h)
    yield p
    p.close()


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    d = tmp_path_factory.mktemp("tmux")
    sim = lambda *a: subprocess.run([sys.executable, "-m", "tracer.cli", "simulate", *a], cwd=ROOT, check=True,
                                    capture_output=True)
    sim("-o", str(d / "x.ndjson"), "--slots", "4", "--threads", "8", "--passthrough", "1", "--profiles", "2")
    sim("-o", str(d / "bad.ndjson"), "--inject", "wrong-victim")
    gets: dict[str, int] = {}
    for line in (d / "x.ndjson").read_bytes().splitlines()[1:]:
        e = orjson.loads(line)
        gets[e["p"]] = gets.get(e["p"], 0) + (e["ev"] == "get_return")
    return d, gets


@pytest.mark.parametrize("pane", [(80, 24), (160, 48)], indirect=True)
def test_screen_shows_the_trace_then_q_restores_the_terminal(pane, traces):
    d, gets = traces
    pane.run_top("--from", str(d / "x.ndjson"), "--speed", "0")
    s = pane.wait_for(lambda s: "end of trace" in s)
    lines = s.splitlines()
    w, h = map(int, pane.info("#{pane_width} #{pane_height}").split())
    assert len(lines) <= h and all(len(x) <= w for x in lines)
    for pid, n in gets.items():  # counted independently from the file
        row = next(x for x in lines if pid in x)
        assert f"{n:,}" in row.split()
    assert "SLOT KEY" in s
    assert len([x for x in lines if re.match(r"\s+[0-3] k[0-9a-f]{12}\s+\d+ (idle|in use)", x)]) == 4
    def selected(screen):  # the profile row marked ▶ in the profile table
        m = re.search(r"^▶(p[0-9a-f]{12}) (\S+)", screen, re.M)
        return m and m.groups()

    first = selected(s)
    assert first and first[1] == "simdisk"
    pane.key("Tab")
    pane.wait_for(lambda s: selected(s) not in (None, first) and selected(s)[1] == "simdisk")
    pane.key("q")
    pane.assert_restored(0)


def test_check_marks_the_divergence_pauses_there_and_exits_1(pane, traces):
    """At full speed the divergence would scroll away at once: playback stops at the
    operation that diverged, its get_return the latest line of the event log."""
    d, _ = traces
    pane.run_top("--from", str(d / "bad.ndjson"), "--speed", "0", "--check")
    s = pane.wait_for(lambda s: "check: DIVERGED" in s)
    assert "PAUSED" in s and "end of trace" not in s
    assert "DIVERGED: get k" in s and "LRU head" in s.replace("\n", " ")
    key = re.search(r"DIVERGED: get (k[0-9a-f]{12})", s).group(1)
    log = s.split("events (latest last)")[1].splitlines()
    assert f"get_return simdisk key={key}" in [x for x in log if x.startswith("+")][-1]
    pane.key("p")
    pane.wait_for(lambda s: "end of trace" in s)
    pane.key("q")
    pane.assert_restored(1)


def test_resize_redraws_and_ctrl_c_restores(pane, traces):
    d, _ = traces
    pane.run_top("--from", str(d / "x.ndjson"), "--speed", "0.0001")  # ~450 s: still running when interrupted
    pane.tmux("resize-window", "-t", "t", "-x", "120", "-y", "40")
    s = pane.wait_for(lambda s: len(s.splitlines()) == 40 and s.splitlines()[-1].startswith("q quit"))
    assert max(len(x) for x in s.splitlines()) > 80
    pane.key("p")
    pane.wait_for(lambda s: "PAUSED" in s)
    pane.key("?")
    pane.wait_for(lambda s: "waits   misses that saw" in s)
    pane.key("C-c")
    pane.assert_restored(0)
