"""Reading a measured curve: linear interpolation on a polyline (the profile's tables of bytes or segments
against seconds)."""

from __future__ import annotations


def interpolate(points: list[tuple[float, float]] | tuple[tuple[float, float], ...], x: float) -> float:
    """``y`` at ``x`` on the polyline through ``points`` (sorted by x), held at the end points' ``y`` outside."""
    if x <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 > x0 else y1
    return points[-1][1]
