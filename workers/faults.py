"""Fault points: real crashes at chosen places, switched on by an environment variable.

The fault suite kills workers for real; some deaths must happen at an exact point (a
batch has started on the device and not ended) that a SIGKILL from outside can only
hit by luck. ``WATTSERVE_FAULT_CRASH_AFTER=<variant>:<k>`` makes every worker process of
``<variant>`` exit hard (``os._exit``, as a segfault or OOM kill would: no cleanup, no
reply) at its first batch that would take it past ``k`` images. A replacement process
counts from zero, so ``k=0`` crashes every batch, retries included.

Unset (the default), a fault point costs one dictionary lookup.
"""

from __future__ import annotations

import os

import structlog

log = structlog.get_logger(__name__)

CRASH_AFTER_ENV = "WATTSERVE_FAULT_CRASH_AFTER"
_done: dict[str, int] = {}  # images this process got through, per variant


def fault_point(where: str, variant: str, images: int) -> None:
    """Crash here if the crash fault is set for ``variant`` and this batch passes ``k``."""
    spec = os.environ.get(CRASH_AFTER_ENV)
    if not spec:
        return
    target, _, after = spec.rpartition(":")
    if target != variant:
        return
    done = _done.get(variant, 0)
    if done + images > int(after):
        log.warning("fault_point_crash", where=where, variant=variant, images_done=done)
        os._exit(17)
    _done[variant] = done + images
