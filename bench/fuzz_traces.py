#!/usr/bin/env python3
"""Fuzz `keyslot-trace replay` at scale: 10^6 mutated real and simulated traces.

Usage: nice python bench/fuzz_traces.py [--cases 1000000] [--seed 1] [--report FILE] [--keep DIR]
       python bench/fuzz_traces.py --case N [--seed 1]      # one case again: what it is, what replay says

Each case is one of the traces in examples/ or a simulated one (several flavours and seeds,
sequential and concurrent, some cut as if recorded from the middle), with raw damage (bytes,
lines, JSON fields and values, the header, gzip) or one semantic mutation (replay/mutate.py's
SEMANTIC_MUTATIONS), run through tracer.cli.main in-process (what the console script runs)
with a time limit, in worker processes of 10,000 cases each (so that a crash or a hang in the
compiled checker is caught as well); one case in --compare-every also runs as the installed
command, which must say the same. The run fails on any traceback, hang, exit outside {0, 1, 2, 3},
difference from the installed command, or AGREE of a semantic mutation that no fact of the
trace explains. tests/replay/test_fuzz_scale.py runs 10^4 of these cases in CI.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.replay.fuzzing import (FILE, UNEXPLAINED, Failure, default_bases, explain_agree,  # noqa: E402
                                  make_case, materialise, report, run_in_process, run_supervised)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=1_000_000)
    ap.add_argument("--start", type=int, default=0, help="first case number (cases are numbered per seed)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--sim-seeds", type=int, default=3, help="simulated traces per flavour")
    ap.add_argument("--limit", type=float, default=10.0, help="seconds a case may run before it is a hang")
    ap.add_argument("--jobs", type=int, default=1, help="worker processes at a time (one core each)")
    ap.add_argument("--compare-every", type=int, default=1000, help="run every Nth case as the installed command too")
    ap.add_argument("--report", type=Path, help="write the Markdown report here too")
    ap.add_argument("--keep", type=Path, help="write each failing or unexplained case's trace into this directory")
    ap.add_argument("--case", type=int, help="make and run this one case, and show it")
    args = ap.parse_args()
    if args.case is not None:
        show(default_bases(args.sim_seeds), args.seed, args.case, args.limit)
        return
    command = "python bench/fuzz_traces.py " + shlex.join(sys.argv[1:])
    cores = f"{args.jobs} worker process{'es' if args.jobs > 1 else ''}"

    said: set = set()

    def progress(stats) -> None:
        failed = sum(n for n, _ in stats.failure_kinds.values())
        print(f"{stats.cases:,} cases, {stats.cases / stats.seconds:,.0f}/s, {failed} failed, "
              f"{len(stats.unexplained)} unexplained", file=sys.stderr, flush=True)
        for f in stats.failures + [Failure(i, base, kind, [], UNEXPLAINED, d) for i, base, kind, d in stats.unexplained]:
            if (f.index, f.what) not in said:  # each as soon as it is known, whole
                said.add((f.index, f.what))
                print(f"  case {f.index} ({f.base}, {f.kind}, {f.argv}): {f.what}\n    {f.detail}", file=sys.stderr,
                      flush=True)

    stats = run_supervised(args.seed, args.start, args.start + args.cases, args.sim_seeds, args.limit,
                           args.compare_every, keep=args.keep, jobs=args.jobs, progress=progress)
    text = report(stats, command, cores)
    print(text)
    if args.report:
        args.report.write_text(text)
    sys.exit(1 if stats.failure_kinds or stats.unexplained else 0)


def show(bases, seed: int, index: int, limit: float) -> None:
    import tempfile

    case = make_case(bases, seed, index)
    print(f"case {index}: {case.base}, {case.group} {case.kind}, argv {case.argv}")
    if case.mutation is not None:
        print(f"  {case.mutation.description}")
    with tempfile.TemporaryDirectory() as d:
        argv, stdin = materialise(case, Path(d))
        out = run_in_process(argv, stdin, limit)
        path = Path(tempfile.gettempdir()) / f"fuzz-case-{seed}-{index}.ndjson"
        path.write_bytes(case.data)
        print(f"  trace written to {path}; exit {out.exit} in {out.seconds:.3f} s")
        print(out.error or (out.stdout + out.stderr))
        if case.group == "semantic" and out.exit == 0:
            print("  AGREE because: %s: %s" % explain_agree(case, {b.name: b for b in bases}[case.base]))
    if FILE in case.argv:
        print(f"  (the command read it from a file: keyslot-trace {' '.join(a if a != FILE else str(path) for a in case.argv)})")


if __name__ == "__main__":
    main()
