"""Fixed vs per-step energy: a least-squares line through (steps, joules per image).

A generation's energy is, to first order, ``J(steps) = fixed_j + per_step_j * steps``:
the denoiser (UNet) runs once per step, the text encoders and the VAE decode once per
image. ``scripts/gpu_check.py`` measures J/image at several step counts and fits that
line here; ``fixed_j / J(default steps)`` is what ``bench.profiles`` calls
``fixed_fraction`` (an assumption there until a GPU measures it).

Pure Python, no numpy: it runs on the bare GPU image and in the CPU tests alike.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class StepFit:
    """``J(steps) = fixed_j + per_step_j * steps`` fitted to measured points."""

    fixed_j: float  # intercept: joules per image that do not scale with steps
    per_step_j: float  # slope: joules per image per denoising step
    r_squared: float | None  # None when every point has the same joules (nothing to explain)
    points: int
    step_counts: tuple[int, ...]  # the distinct step counts measured, ascending
    default_steps: int
    j_at_default: float  # the fitted line at ``default_steps``
    # fixed_j / j_at_default; None when the line is not positive there. Noise can put it
    # below 0 (or at/above 1): it is reported as fitted, never clamped.
    fixed_fraction_at_default: float | None
    rms_residual_j: float

    def predict(self, steps: float) -> float:
        """The fitted joules per image at ``steps``."""
        return self.fixed_j + self.per_step_j * steps

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, with the step counts as a list."""
        out = asdict(self)
        out["step_counts"] = list(self.step_counts)
        return out


def fit_line(points: Iterable[tuple[float, float]]) -> tuple[float, float, float | None, float]:
    """Ordinary least squares ``y = a + b x``: (a, b, R², RMS residual).

    Raises ``ValueError`` for non-finite values or fewer than 2 distinct ``x``.
    """
    xs, ys = [], []
    for x, y in points:
        x, y = float(x), float(y)
        if not (math.isfinite(x) and math.isfinite(y)):
            raise ValueError(f"non-finite point ({x}, {y})")
        xs.append(x)
        ys.append(y)
    distinct = sorted(set(xs))
    if len(distinct) < 2:
        raise ValueError(
            "a fixed vs per-step split needs points at 2 or more distinct step counts; "
            f"got {len(xs)} point(s) at step count(s) {distinct}"
        )
    n = len(xs)
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mean_x) ** 2 for x in xs)
    sxy = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True))
    slope = sxy / sxx
    intercept = mean_y - slope * mean_x
    ss_res = sum((y - intercept - slope * x) ** 2 for x, y in zip(xs, ys, strict=True))
    ss_tot = sum((y - mean_y) ** 2 for y in ys)
    r_squared = 1.0 - ss_res / ss_tot if ss_tot > 0 else None
    return intercept, slope, r_squared, math.sqrt(ss_res / n)


def fit_step_energy(points: Iterable[tuple[int, float]], default_steps: int) -> StepFit:
    """Fit ``J(steps) = fixed_j + per_step_j * steps`` to (steps, J/image) points.

    Every point counts (repeats at one step count are not averaged first). Raises
    ``ValueError`` when fewer than 2 distinct step counts are given, a step count is
    below 1, or a value is not finite.
    """
    if default_steps < 1:
        raise ValueError(f"default_steps must be >= 1, got {default_steps}")
    pairs = [(int(steps), float(joules)) for steps, joules in points]
    for steps, _ in pairs:
        if steps < 1:
            raise ValueError(f"step counts must be >= 1, got {steps}")
    fixed_j, per_step_j, r_squared, rms = fit_line(pairs)
    j_at_default = fixed_j + per_step_j * default_steps
    return StepFit(
        fixed_j=fixed_j,
        per_step_j=per_step_j,
        r_squared=r_squared,
        points=len(pairs),
        step_counts=tuple(sorted({steps for steps, _ in pairs})),
        default_steps=default_steps,
        j_at_default=j_at_default,
        fixed_fraction_at_default=fixed_j / j_at_default if j_at_default > 0 else None,
        rms_residual_j=rms,
    )
