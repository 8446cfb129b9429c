"""The demo's candidate schedules, and the scan that keeps the fastest one above the quality bar.

A family is one way of making schedules (calibrated per component, calibrated per block, a
uniform interval, or intervals denser in the middle of the generation) with one treatment of skipped
steps (reuse, full forecast, damped forecast), listed from the mildest setting to the fastest. The scan evaluates each family's settings in that
order and stops a family at its first setting below the bar: quality falls as the setting gets
faster, and on the demo's few samples one sample is one or more accuracy points, so a faster
setting that passes after a slower one failed is a lucky draw, not a kept bar. The first demo runs
chose exactly such a schedule (per-block forecast at 3.0x after 1.25x-2.5x had failed), and 500
samples put it below the bar (BENCHMARKS.md, Frontier). Stopping also saves the generations of the
settings beyond.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from smoothcache_fx.schedules import Schedule


@dataclass(frozen=True)
class Family:
    """Candidate schedules of one kind and keying, mildest first: `build(i)` makes the schedule of
    `settings[i]` (ValueError: beyond what this family reaches, which ends it)."""

    kind: str  # what a skipped step does: "reuse", "forecast" or "damped"
    keying: str  # how the masks are made: "per comp.", "per block", "uniform" or "piecewise"
    settings: tuple[str, ...]
    build: Callable[[int], Schedule]


def calibrated_families(
    errors, kind: str, max_order: int, strength: float, targets: Sequence[float]
) -> list[Family]:
    """`Schedule.for_speedup` at each target, per component and per block, with forecast strength
    `strength` on every key that forecasts."""

    def family(per_block: bool) -> Family:
        def build(index: int) -> Schedule:
            schedule = Schedule.for_speedup(
                errors, target=targets[index], max_order=max_order, per_block=per_block
            )
            return schedule.with_strengths(strength)

        settings = tuple(f"target {t:.2f}x" for t in targets)
        return Family(kind, "per block" if per_block else "per comp.", settings, build)

    return [family(False), family(True)]


def uniform_family(
    steps: int, components: Sequence[str], strength: float, intervals: Sequence[int]
) -> Family:
    """`components` computed every n-th step and at step 1 and the last (`Schedule.uniform`'s
    forecasting recipe), order 1 at forecast strength `strength`: few distinct masks, so
    `compile=True` runs it as whole-model graphs."""
    intervals = [n for n in intervals if n < steps]
    return _forecast_family(
        "uniform",
        tuple(f"every {n}" for n in intervals),
        lambda index: Schedule.uniform(steps, intervals[index], components, extra_steps=(1, steps - 1)),
        strength,
    )


def piecewise_family(
    steps: int, components: Sequence[str], strength: float, middles: Sequence[int]
) -> Family:
    """As `uniform_family`, but the middle stretch of the generation (from 30% to 70% of the steps)
    computes twice as often as the rest: every 2m / m / 2m steps (`Schedule.piecewise`). On the demo
    DiT a compute in the middle buys the most quality (BENCHMARKS.md, "Where computes matter")."""
    middles = [m for m in middles if 2 * m < steps]
    starts = (round(0.3 * steps), round(0.7 * steps))

    def masks(index: int) -> Schedule:
        middle = middles[index]
        pieces = {0: 2 * middle, starts[0]: middle, starts[1]: 2 * middle}
        return Schedule.piecewise(steps, pieces, components, extra_steps=(1, steps - 1))

    return _forecast_family(
        "piecewise", tuple(f"every {2 * m}/{m}/{2 * m}" for m in middles), masks, strength
    )


def _forecast_family(
    keying: str, settings: tuple[str, ...], masks: Callable[[int], Schedule], strength: float
) -> Family:
    """A family whose `masks(i)` schedules forecast every key with order 1 at `strength`."""

    def build(index: int) -> Schedule:
        schedule = masks(index)
        return schedule.with_orders(dict.fromkeys(schedule.keys, 1)).with_strengths(strength)

    return Family("damped" if strength < 1.0 else "forecast", keying, settings, build)


def scan_candidates(families: Sequence[Family], evaluate, log=print):
    """Evaluate the families' candidates; returns (best, curve): `best` the (schedule, point) of
    the largest ideal speed-up that kept the quality bar, or None, and `curve` every evaluated
    point in order. `evaluate(schedule)` returns a dict with at least `ideal_speedup`, `psnr_db`,
    `accuracy` and `keeps_quality`."""
    curve, best = [], None
    for family in families:
        for index, setting in enumerate(family.settings):
            try:
                schedule = family.build(index)
            except ValueError:
                break  # beyond the largest speed-up this family reaches
            point = {
                "kind": family.kind,
                "keying": family.keying,
                "per_block": family.keying == "per block",
                "setting": setting,
                "target": schedule.metadata.get("target"),
                "alpha": schedule.metadata.get("alpha"),
                "orders": dict(schedule.orders),
                "strengths": dict(schedule.strengths),
                **evaluate(schedule),
            }
            curve.append(point)
            alpha = "" if point["alpha"] is None else f"alpha {point['alpha']:.3f}, "
            log(
                f"  {family.kind:<8} {family.keying:<9} {setting:<13} {alpha}ideal "
                f"{point['ideal_speedup']:.2f}x, PSNR {point['psnr_db']:.1f} dB, accuracy "
                f"{point['accuracy']:.1%}{orders_note(schedule)}"
                f"{'' if point['keeps_quality'] else ' (below the quality bar)'}"
            )
            if not point["keeps_quality"]:
                later = family.settings[index + 1 :]
                if later:
                    log(
                        f"  {family.kind:<8} {family.keying:<9} not trying {', '.join(later)}: a faster "
                        "setting passing after this one failed would be a lucky draw"
                    )
                break
            if best is None or point["ideal_speedup"] > best[1]["ideal_speedup"]:
                best = (schedule, point)
    return best, curve


def orders_note(schedule: Schedule) -> str:
    """`, orders {...}` (and the strength, if damped) for a schedule that forecasts, else nothing."""
    if not schedule.orders:
        return ""
    strengths = set(schedule.strengths.values())
    damped = f" at strength {strengths.pop():g}" if len(strengths) == 1 else ""
    return f", orders {dict(schedule.orders)}{damped}"
