"""The installed command's entry point, which takes SIGINT and SIGTERM from its first
moment. Loading the tool (click, the replay engines) takes a tenth of a second on a
machine and 8-25 s in the test VM under load, where bench/signal_rounds.py's signals
landed in it: SIGINT printed a KeyboardInterrupt traceback, SIGTERM killed it. A stop
asked for while loading now ends the command quietly, before it has done anything, with
the status a shell gives a process the signal killed (128 + the signal). From then on
the commands' own handling applies (record and live top: tracer/cli.py, _EarlyStop)."""

import signal
import sys


def main() -> None:
    pending: list[int] = []

    def note(signum, frame) -> None:
        pending.append(signum)

    old = {s: signal.signal(s, note) for s in (signal.SIGINT, signal.SIGTERM)}
    from tracer import cli

    for s, handler in old.items():
        signal.signal(s, handler)
    if pending:
        sys.exit(128 + pending[0])
    cli.main()
