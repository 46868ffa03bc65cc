"""A discrete-event run of the planner against a simulated clock.

For tests and for reasoning about the policy (``python -m sgl_kvtier.prefill.simulate``):
the durations of compute chunks and unit loads come from functions of the simulated time,
so constant, changing, adversarial and stalled rates can be played exactly and fast.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass

from sgl_kvtier.prefill.planner import MeetPlanner, PlanReport, Span, Wait
from sgl_kvtier.prefill.rates import RateBook

__all__ = ["SimResult", "simulate", "constant", "harmonic_bound"]

# (tokens, simulated start time) -> seconds
Duration = Callable[[int, float], float]


@dataclass
class SimResult:
    seconds: float
    report: PlanReport
    computed: list[tuple[int, int]]  # spans in the order they were computed
    loaded: list[int]  # units in the order they landed
    cancelled: list[int]


def constant(tokens_per_s: float) -> Duration:
    """Every token takes the same time."""
    return lambda tokens, t: tokens / tokens_per_s


def harmonic_bound(n: int, compute_tps: float, load_tps: float) -> float:
    """Best time with both rates constant: ``T_c T_l / (T_c + T_l) = N / (R_c + R_l)``."""
    return n / (compute_tps + load_tps)


def simulate(bounds: list[int], chunk: int, compute: Duration, load: Duration,
             load_ok: Callable[[int], bool] = lambda j: True,
             rates: RateBook | None = None) -> SimResult:
    """Run one prefix to completion; ``load`` may return ``math.inf`` (a stalled read)."""
    planner = MeetPlanner(bounds, chunk, rates or RateBook.empty(), 0.0)
    t, computing, loading, poll = 0.0, None, None, None
    out = SimResult(0.0, planner.report, [], [], [])
    loader_on = True
    for _ in range(1_000_000):  # a policy that waits forever fails here, not hangs
        if computing is None and planner.done():
            break
        if computing is None and poll is None:
            step = planner.next_compute(t)
            if step is None:
                break
            if isinstance(step, Wait):
                poll = t + step.seconds
            else:
                if loading is not None and step.takes_over == loading[0]:
                    out.cancelled.append(loading[0])
                    planner.load_done(loading[0], False, t)
                    loading = None
                computing = (step, t + compute(step.end - step.start, t))
        if loading is None and loader_on:
            unit = planner.next_load(t)
            if unit is None:
                loader_on = False
            else:
                loading = (unit, t + load(bounds[unit + 1] - bounds[unit], t))
        events = [e for e in (computing and computing[1], loading and loading[1], poll)
                  if e is not None]
        t_next = min(events)
        if math.isinf(t_next):
            raise RuntimeError("simulation stalled: nothing can finish")
        t = t_next
        if computing is not None and computing[1] <= t:
            planner.compute_done(computing[0], t)
            out.computed.append((computing[0].start, computing[0].end))
            computing = None
        if loading is not None and loading[1] <= t:
            ok = load_ok(loading[0])
            planner.load_done(loading[0], ok, t)
            if ok:
                out.loaded.append(loading[0])
            loading = None
        if poll is not None and poll <= t:
            poll = None
    else:
        raise RuntimeError(f"simulation made no progress by t={t:.3f}s: {planner.report}")
    out.seconds = t
    return out


def _span(s: Span) -> str:
    return f"[{s.start},{s.end})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m sgl_kvtier.prefill.simulate",
        description="Play the bidirectional-prefill planner against constant rates on a "
                    "simulated clock and compare with the best possible time.")
    p.add_argument("--tokens", type=int, default=4096, help="cached prefix length")
    p.add_argument("--unit", type=int, default=256, help="tokens per tier chunk (load unit)")
    p.add_argument("--chunk", type=int, default=512, help="tokens per compute chunk")
    p.add_argument("--compute", type=float, default=1000.0, help="compute rate, tokens/s")
    p.add_argument("--load", type=float, nargs="+", default=[250, 500, 1000, 2000, 4000],
                   help="load rates to try, tokens/s")
    args = p.parse_args(argv)
    bounds = list(range(0, args.tokens, args.unit)) + [args.tokens]
    print("| load tok/s | compute only s | load only s | bidirectional s | bound s | split |")
    print("|---:|---:|---:|---:|---:|---:|")
    for rate in args.load:
        r = simulate(bounds, args.chunk, constant(args.compute), constant(rate))
        print(f"| {rate:g} | {args.tokens / args.compute:.3f} | {args.tokens / rate:.3f} | "
              f"{r.seconds:.3f} | {harmonic_bound(args.tokens, args.compute, rate):.3f} | "
              f"{r.report.split} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
