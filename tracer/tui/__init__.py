"""The live view behind `keyslot-trace top`: aggregate.py turns trace events into
Snapshots, render.py draws a Snapshot (pure), tracer/top.py runs the loop."""
