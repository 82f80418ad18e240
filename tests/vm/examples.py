"""Cut the bundled example traces in examples/ out of the VM tests' recordings.

Every example a newcomer replays (README command 1) is a window of a real recording, cut
the way the tests cut it (tests/kernel/traces.py window_bytes), never written by hand:

    python3 tests/vm/examples.py            # after tests/run (reads ~/.cache/keyslot-trace/vm-out)
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.kernel.traces import window_bytes  # noqa: E402
from tests.vm.vm import CACHE_ROOT  # noqa: E402

# example file -> (generation, probe type whose trace it is cut from, scenario)
EXAMPLES = {
    "linux-5.10-ksdisk-native-lru.ndjson": ("5.10", "auto", "native-lru"),
    "linux-6.12-ksdisk-native-lru.ndjson": ("6.12", "fentry", "native-lru"),
}


def main() -> int:
    for name, (gen, probe_type, scenario) in EXAMPLES.items():
        out = CACHE_ROOT / "vm-out" / f"recording-{gen}"
        window = json.loads((out / "run.json").read_text())["scenarios"][scenario]
        data = window_bytes((out / f"trace-{probe_type}.ndjson").read_bytes(), window["start_ns"], window["end_ns"])
        (ROOT / "examples" / name).write_bytes(data)
        events = data.count(b"\n") - 1
        print(f"examples/{name}: {events} events from {out.name}/trace-{probe_type}.ndjson")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
