"""Benchmarking wattserve against a named baseline: workload traces and their replay.

``bench.trace`` makes, writes, reads and summarises the request traces every benchmark
replays; see its ``__all__`` for the public surface.
"""
