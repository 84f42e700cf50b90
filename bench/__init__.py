"""Benchmarking wattserve against a named baseline, live and at fleet scale.

* ``bench.trace``: make, write, read and summarise the request traces benchmarks replay.
* ``bench.live``: ``wattserve bench`` — replay a trace against a running service, then
  its baseline on the same service.
* ``bench.profiles``: energy/latency models fitted to the ML.ENERGY measurements.
* ``bench.fleet``, ``bench.simulate``, ``bench.sim_report``, ``bench.plots``:
  ``wattserve simulate`` — the live decision code over a simulated fleet, against the
  baseline and the offline oracle.
* ``bench.cap_watch``: a burst of requests while the cluster's power is sampled, for the
  power-cap test and ``benchmarks/cluster_budget.py``.

Depends on ``policies``, ``scheduler`` (pure parts), ``telemetry`` and the SDK; the CLI
depends on it. Nothing here imports Ray.
"""
