"""`keyslot-trace report`: one self-contained HTML page, checked as HTML, against the trace's own
events, and in a real browser (Debian's chromium, headless: tests/run installs it; never skipped)."""

import itertools
import re
import shutil
import struct
import subprocess
import zlib
from collections import Counter, defaultdict
from html.parser import HTMLParser
from pathlib import Path

import pytest
from click.testing import CliRunner

from replay.checker import Verdict, check
from replay.report import describe_op, observed
from replay.simulate import INJECTIONS
from replay.trace import parse_trace, read_trace
from replay.whatif import demands, replay
from tests.conftest import sim_bytes
from tracer.cli import cli
from tracer.htmlreport import render

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.ndjson"))
VOID = {"meta", "br", "hr", "img", "input", "link", "wbr"}
BADGE = {"AGREE": (0x1A, 0x7F, 0x37), "DIVERGED": (0xCF, 0x22, 0x2E), "UNKNOWN": (0x9A, 0x67, 0x00)}


class Page(HTMLParser):
    """Parses strictly (every element closed, in order) and keeps each element with its attributes,
    the text inside it and the elements inside it."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.stack, self.elements, self.errors = [], [], []
        self.feed(text)
        self.close()
        assert text.startswith("<!DOCTYPE html>")
        assert not self.errors, self.errors[:5]
        assert not self.stack, f"never closed: {[el['tag'] for el in self.stack]}"

    def handle_starttag(self, tag, attrs, void=False):
        el = {"tag": tag, "attrs": dict(attrs), "text": [], "inside": []}
        for parent in self.stack:
            parent["inside"].append(el)
        self.elements.append(el)
        if not void and tag not in VOID:
            self.stack.append(el)

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs, void=True)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1]["tag"] != tag:
            self.errors.append(f"</{tag}> closes <{self.stack[-1]['tag'] if self.stack else None}>")
        else:
            self.stack.pop()

    def handle_data(self, data):
        for el in self.stack:
            el["text"].append(data)

    def find(self, tag=None, within=None, cls=None) -> list[dict]:
        return [el for el in (within["inside"] if within else self.elements) if (tag is None or el["tag"] == tag)
                and (cls is None or cls in el["attrs"].get("class", "").split())]

    def by_id(self, id_) -> dict:
        (el,) = [el for el in self.elements if el["attrs"].get("id") == id_]
        return el


def text(el) -> str:
    return "".join(el["text"])


def cli_run(*args, **kw):
    return CliRunner().invoke(cli, list(args), **kw)


def make_report(tmp_path, trace_path, *extra) -> Page:
    out = tmp_path / "report.html"
    r = cli_run("report", str(trace_path), "-o", str(out), *extra)
    assert r.exit_code == 0, r.output
    assert r.stderr.count("\n") == 1 and r.stderr.startswith(f"{out}: "), r.stderr
    page = Page(out.read_text())
    check_self_contained(page)
    return page


def check_self_contained(page: Page) -> None:
    """Nothing to fetch at view time: no script, no external stylesheet, image or link."""
    assert not page.find("script") and not page.find("link") and not page.find("img")
    for el in page.elements:
        for k, v in el["attrs"].items():
            assert k not in ("src", "href") and "url(" not in (v or ""), el


def check_against_trace(page: Page, trace, result) -> None:
    """The verdict is the checker's; each profile's row and slot rows agree with the trace's own
    events (counted here, not by the aggregator the report uses)."""
    (badge,) = page.find(cls="verdict")
    assert text(badge) == result.verdict.name
    counts = defaultdict(Counter)
    for ev in trace.events:
        if ev.profile is not None:
            counts[ev.profile][ev.kind.name] += 1
    for p in result.profiles:
        (row,) = [r for r in page.find("tr", page.by_id("summary")) if text(r).startswith(p.profile + " (")]
        cells = [text(c) for c in page.find("td", row)]
        assert cells[1] == p.verdict.name
        assert cells[2] == f"{counts[p.profile]['get_return']:,}"  # gets
        assert cells[5] == f"{counts[p.profile]['program_return']:,}"  # programs
        assert cells[8] == f"{counts[p.profile]['evict_return']:,}"  # evicts
        section = page.by_id(f"profile-{p.profile}")
        slot_rows = page.find("g", section, cls="slot-row")
        if p.num_slots == 0:
            assert not slot_rows and "Passthrough" in text(section)
            continue
        assert [int(g["attrs"]["data-slot"]) for g in slot_rows] == list(range(p.num_slots or 0))
        assert [text(page.find("text", g)[0]) for g in slot_rows] == [f"slot {s}" for s in range(p.num_slots or 0)]
        # every key a slot's row shows was programmed into that slot, as the trace's events say
        programmed = {(ev.slot, ev.key) for ev in trace.events if ev.profile == p.profile
                      and ev.kind.name == "program_return" and ev.result == 0}
        for g in slot_rows:
            s = int(g["attrs"]["data-slot"])
            shown = {text(r).split()[0] for r in page.find("rect", g) if text(r)}
            assert shown <= {k for slot, k in programmed if slot == s}, (s, shown)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_real_trace(tmp_path, path):
    trace = read_trace(path)
    result = check(trace)
    page = make_report(tmp_path, path)
    check_against_trace(page, trace, result)
    assert not page.find(cls="divergent") and "divergence" not in {el["attrs"].get("id") for el in page.elements}
    # what-if: the recorded count's row is the replay with it, marked as the trace's own
    for d in demands(trace):
        section = page.by_id(f"profile-{d.profile}")
        (row,) = page.find("tr", section, cls="recorded")
        o = replay(d, d.num_slots)
        assert [text(c) for c in page.find("td", row)][:2] == [f"{d.num_slots} ◀", f"{o.programs:,}"]
        assert text(page.find("td", row)[-1]) == "trace"
        assert all(text(page.find("td", r)[-1]) == "model" for r in page.find("tr", section, cls="model"))
        assert "Every other K is the model's estimate." in text(section)
        assert len(page.find("circle", section, cls="recorded")) == 1


def test_the_timeline_of_a_small_trace_shows_each_residency():
    """format-example: slot 0 holds one key from its program to its evict, in use while the two gets
    hold it; slot 1 is never used."""
    trace = read_trace(EXAMPLES[[p.name for p in EXAMPLES].index("format-example.ndjson")])
    page = Page(render(trace, "format-example.ndjson", check(trace), [1, 2, 3]))
    slot0, slot1 = page.find("g", cls="slot-row")
    (held,) = [r for r in page.find("rect", slot0) if text(r)]
    assert text(held).startswith("k8a41be07c1d2 +") and held["attrs"]["fill"].startswith("hsl(")
    t0, t1 = 1000, 31000  # the trace's first and last events; the key is held from 9100 to 30900 ns
    x = lambda t: (t - t0) * 1000 // (t1 - t0)  # noqa: E731  (the timeline's column of time t)
    assert int(held["attrs"]["x"]) - 110 == x(9100) and int(held["attrs"]["width"]) == x(30900 - 1) - x(9100) + 1
    busy = page.find("rect", slot0, cls="busy")
    assert busy and min(int(r["attrs"]["x"]) - 110 for r in busy) == x(9100)
    assert max(int(r["attrs"]["x"]) + int(r["attrs"]["width"]) - 110 for r in busy) == x(21100 - 1) + 1  # (its last ns)
    assert not [r for r in page.find("rect", slot1) if text(r)] and not page.find("rect", slot1, cls="busy")


SIMULATED = [
    {"requests": 400, "slots": 2, "threads": 6},
    {"requests": 400, "profiles": 2, "passthrough": 1, "program_failure": 0.05, "reprogram_rate": 0.02},
    {"requests": 300, "semantics": "android", "evict_rate": 0.1},
]


@pytest.mark.parametrize("kw", SIMULATED, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_simulated_traces(kw):
    data, _ = sim_bytes(**kw, seed=3)
    trace = parse_trace(data, "sim.ndjson")
    result = check(trace)
    page = Page(render(trace, "sim.ndjson", result, list(range(1, 9))))
    check_self_contained(page)
    check_against_trace(page, trace, result)


def diverged(tmp_path, inject="wrong-victim") -> Path:
    bad = tmp_path / "bad.ndjson"
    r = cli_run("simulate", "--inject", inject, "--requests", "600", "-o", str(bad))
    assert r.exit_code == 0, r.output
    return bad


@pytest.mark.parametrize("inject", sorted(INJECTIONS))
def test_a_diverged_trace_shows_the_operation_and_the_model_state(tmp_path, inject):
    bad = diverged(tmp_path, inject)
    trace = read_trace(bad)
    result = check(trace)
    assert result.verdict is Verdict.DIVERGED
    page = make_report(tmp_path, bad, "--slots", "1-12")
    check_against_trace(page, trace, result)
    d = result.divergence
    section = page.by_id("divergence")
    words = text(section)
    first = d.op.call or d.op.ret
    assert f"First operation the model cannot explain: {describe_op(d.op)}" in words
    assert f"line {first.line}-{d.op.line}, cpu {d.op.cpu}, tid {d.op.tid}" in words
    assert d.reason in words and observed(d.op, result.flavour) in words and "; ".join(d.allowed) in words
    (state,) = [text(p) for p in page.find("pre", section) if text(p).startswith(d.state_before[0])]
    assert state.split("\n") == d.state_before
    # the picture: a row per thread, the divergent operation's bar marked, from its call to its return
    (bar,) = page.find("rect", section, cls="divergent")
    assert text(bar).startswith(describe_op(d.op))
    tids = {f"tid {r.tid}" if r.tid else f"cpu {r.cpu} (tid 0)" for r in (d.op, *d.inflight)}
    labels = {text(t) for t in page.find("text", section)}
    assert tids <= labels
    assert len(page.find("rect", section, cls="inflight")) == len([r for r in d.inflight if r.call is not None])
    # and the profile's slots around it
    rows = page.find("g", section, cls="slot-row")
    assert [int(g["attrs"]["data-slot"]) for g in rows] == list(range(result.profiles[0].num_slots))


@pytest.mark.parametrize("inject", ["refcount-leak", "lost-put"])
def test_a_diverged_trace_names_the_earlier_operation_as_replay_does(tmp_path, inject):
    """The issue's reproduction: the page names the put that leaked (the line `simulate` prints), or
    the get whose put was lost, in the very lines `replay` prints under the same heading."""
    bad = tmp_path / "bad.ndjson"
    r = cli_run("simulate", "--inject", inject, "--requests", "600", "-o", str(bad))
    m = re.search(rf"injected {inject} at line (\d+) \(slot (\d+)\)", r.stderr)
    assert m, r.stderr
    slot = int(m[2])
    (h,) = [h for h in check(read_trace(bad)).divergence.earlier if h.slot == slot and h.since]
    want = int(m[1]) if inject == "refcount-leak" else h.since[0].call.line  # (lost-put: the get it released)
    replayed = cli_run("replay", str(bad), env={"COLUMNS": "1000"}).stdout.splitlines()  # (no wrapping)
    start = replayed.index("  the last operation on each slot it depends on:") + 1
    lines = [ln.strip() for ln in itertools.takewhile(lambda ln: ln.startswith("    "), replayed[start:])]
    use = "idle" if inject == "refcount-leak" else "in use"
    assert [ln for ln in lines if re.fullmatch(rf"slot {slot}, [^:]*: .*\(line {want}-[^)]*\), since then {use}", ln)]
    page = make_report(tmp_path, bad)
    section = page.by_id("divergence")
    assert "The last operation on each slot it depends on" in {text(h3) for h3 in page.find("h3", section)}
    (ul,) = page.find("ul", section, cls="earlier")
    assert [text(li) for li in page.find("li", ul)] == lines
    # the keys in those lines are the trace's strings: markup in them stays text
    keys = sorted(set(re.findall(r"\bk[0-9a-f]{12}\b", " ".join(lines))))
    assert keys or inject == "refcount-leak"  # (lost-put: the get whose reference the lost put released)
    for key in keys:
        bad.write_text(bad.read_text().replace(f'"{key}"', f'"{key}<b>&amp;</b>"'))
    page = make_report(tmp_path, bad)
    assert not page.find("b")
    (ul,) = page.find("ul", cls="earlier")
    assert all(f"{key}<b>&amp;</b> (line" in text(ul) for key in keys)


def test_everything_from_the_trace_is_escaped(tmp_path):
    """Keys, profiles, devices and header fields are the trace's strings: markup in them stays text."""
    evil = '<img src=x onerror="alert(1)">&amp;'
    lines = EXAMPLES[[p.name for p in EXAMPLES].index("format-example.ndjson")].read_text()
    lines = (lines.replace('"6.1.192"', '"<script>k</script>"').replace("blk-crypto-fallback", evil.replace('"', '\\"'))
             .replace("k8a41be07c1d2", "k<b>1</b>").replace('"host":"vm"', '"host":"</p><i>h"'))
    path = tmp_path / "evil.ndjson"
    path.write_text(lines)
    page = make_report(tmp_path, path)
    assert {el["tag"] for el in page.elements}.isdisjoint({"img", "script", "b", "i"})
    words = text(page.find("body")[0])
    assert evil in words and "k<b>1</b>" in words and "<script>k</script>" in words and "</p><i>h" in words


HEADER = b'{"format":"keyslot-trace","version":"1.0","api":"blk_crypto","semantics":"mainline-unlink"}\n'


@pytest.mark.parametrize("case", ["bad JSON", "bad event", "missing", "no such dir out", "full disk",
                                  "directory out", "the trace itself", "bad --slots"])
def test_bad_input_is_one_line_and_exit_2(tmp_path, monkeypatch, case):
    monkeypatch.chdir(tmp_path)
    good = tmp_path / "good.ndjson"
    good.write_bytes(EXAMPLES[0].read_bytes())
    Path("bad.ndjson").write_bytes(HEADER + {"bad JSON": b'{"t":1,"cpu\n', "bad event": b'{"t":1}\n'}.get(case, b""))
    args, where = {
        "bad JSON": (("bad.ndjson", "-o", "x.html"), "bad.ndjson:2: malformed JSON"),
        "bad event": (("bad.ndjson", "-o", "x.html"), "bad.ndjson:2: "),
        "missing": (("nope.ndjson", "-o", "x.html"), "nope.ndjson: No such file"),
        "no such dir out": ((str(good), "-o", "/nonexistent/x.html"), "/nonexistent/x.html: No such file"),
        "full disk": ((str(good), "-o", "/dev/full"), "/dev/full: No space left"),
        "directory out": ((str(good), "-o", str(tmp_path)), f"{tmp_path}: Is a directory"),
        "the trace itself": ((str(good), "-o", str(good)), "is the trace itself"),
        "bad --slots": ((str(good), "-o", "x.html", "--slots", "0-4"), "--slots"),
    }[case]
    r = cli_run("report", *args)
    assert r.exit_code == 2 and not Path("x.html").exists(), r.output
    assert where in r.stderr and "Traceback" not in r.stderr, r.stderr
    if case != "bad --slots":  # (click's usage error: its usual three lines)
        assert r.stderr.count("\n") == 1, r.stderr
    assert good.read_bytes() == EXAMPLES[0].read_bytes()


def test_stdout_and_gzipped_stdin():
    import gzip

    data = EXAMPLES[0].read_bytes()
    r = cli_run("report", "-", "-o", "-", input=gzip.compress(data))
    assert r.exit_code == 0, r.stderr
    Page(r.stdout)
    assert r.stderr.startswith("stdout: AGREE, ")


# -- in a real browser ----------------------------------------------------------------

CHROMIUM = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium(tmp_path, *args) -> subprocess.CompletedProcess:
    exe = shutil.which("chromium")
    assert exe, "Debian's chromium is not installed (apt-get install chromium; tests/run installs it)"
    profile = tmp_path / f"chromium-profile-{len(list(tmp_path.iterdir()))}"
    profile.mkdir()
    return subprocess.run([exe, *CHROMIUM, f"--user-data-dir={profile}", *args], capture_output=True,
                          timeout=300, check=True)


def png_pixels(data: bytes) -> tuple[int, int, Counter]:
    """Decode an 8-bit RGB or RGBA PNG (what chromium writes): width, height and a count of each colour."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat = 8, []
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            w, h, depth, ctype, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert depth == 8 and ctype in (2, 6) and not interlace, (depth, ctype, interlace)
        elif kind == b"IDAT":
            idat.append(body)
        pos += 12 + n
    bpp = 3 if ctype == 2 else 4
    raw, stride = zlib.decompress(b"".join(idat)), w * bpp
    prev, colours = bytearray(stride), Counter()
    for y in range(h):
        f, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        if f == 2:  # up: most of chromium's rows
            line = bytearray((x + b) & 255 for x, b in zip(line, prev))
        elif f:  # sub, average, Paeth: each byte from the one bpp to its left
            for i in range(stride):
                a, b, c = (line[i - bpp], prev[i], prev[i - bpp]) if i >= bpp else (0, prev[i], 0)
                if f == 3:
                    a = (a + b) // 2
                elif f == 4:
                    pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - 2 * c)  # |p - a|, |p - b|, |p - c|
                    a = a if pa <= pb and pa <= pc else b if pb <= pc else c
                line[i] = (line[i] + a) & 255
        colours.update(bytes(line[i:i + 3]) for i in range(0, stride, bpp))
        prev = line
    return w, h, colours


@pytest.mark.parametrize("which", ["wrong-victim", "fallback-4slots.ndjson"])
def test_in_chromium(tmp_path, which):
    path = diverged(tmp_path) if which == "wrong-victim" else EXAMPLES[[p.name for p in EXAMPLES].index(which)]
    result = check(read_trace(path))
    report = tmp_path / "report.html"
    assert cli_run("report", str(path), "-o", str(report)).exit_code == 0
    url = report.resolve().as_uri()
    shot = tmp_path / "shot.png"
    chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,2000", url)
    w, h, colours = png_pixels(shot.read_bytes())
    assert (w, h) == (1280, 2000)
    assert len(colours) > 50, f"{len(colours)} colours: not a rendered page"
    white = colours[b"\xff\xff\xff"]
    assert 0.3 * w * h < white < 0.97 * w * h, white / (w * h)
    assert colours[bytes(BADGE[result.verdict.name])] > 500  # the verdict's badge, drawn
    dom = chromium(tmp_path, "--dump-dom", url).stdout.decode()
    page = Page("<!DOCTYPE html>" + dom if not dom.startswith("<!DOCTYPE") else dom)
    (badge,) = page.find(cls="verdict")
    assert text(badge) == result.verdict.name
    for p in result.profiles:
        rows = page.find("g", page.by_id(f"profile-{p.profile}"), cls="slot-row")
        assert [text(page.find("text", g)[0]) for g in rows] == [f"slot {s}" for s in range(p.num_slots)]
    if result.divergence is not None:
        assert len(page.find("rect", page.by_id("divergence"), cls="divergent")) == 1


HAND_BUILT = sorted((Path(__file__).resolve().parents[1] / "replay" / "traces").glob("*.ndjson"))


@pytest.mark.parametrize("path", HAND_BUILT, ids=lambda p: p.name)
def test_the_minimal_traces_of_each_class(path):
    """tests/replay/traces: histories no kernel makes, missing events, losses: odd shapes of operations
    (a callback outside any, a return without its call) still make a page, with the checker's verdict."""
    trace = read_trace(path)
    result = check(trace)
    page = Page(render(trace, path.name, result, [1, 2]))
    check_against_trace(page, trace, result)
    if result.divergence is not None:
        section = page.by_id("divergence")
        assert describe_op(result.divergence.op) in text(section)
        assert len(page.find("rect", section, cls="divergent")) == (result.divergence.op.call is not None)
