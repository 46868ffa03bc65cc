"""The CI performance report: ``python -m sgl_kvtier.eval perf BENCH.json``.

Reads the ``--benchmark-json`` file of a pytest run and says, one line per benchmark,

- the ratio each test measured in-process against its reference path and the bound
  written next to the test (the gate that matters; the test itself fails on it too);
- the fastest round now against the committed baseline (``eval/baselines``, written with
  ``--benchmark-save``): reported, and flagged as drift past the tripwire, but not a gate
  unless asked for (``fail_on_drift``). Absolute times on shared machines move by tens of
  percent, and CI's machine need not be the one the baseline was saved on: a fresh CI clone
  measured the store-read check at 2.00x its baseline while its in-process ratio (1.02) sat
  well inside its bound.

This replaces ``--benchmark-compare-fail``, which ends pytest from inside its terminal
summary (no summary line, exit status 3) and is a usage error when no baseline exists for
the machine id.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

__all__ = ["machine_id", "load_baseline", "report"]

DEFAULT_BASELINES = Path("eval/baselines")
DEFAULT_TRIPWIRE = 2.0


def machine_id() -> str:
    """pytest-benchmark's storage folder name for this interpreter."""
    major_minor = ".".join(platform.python_version_tuple()[:2])
    return (f"{platform.system()}-{platform.python_implementation()}-{major_minor}-"
            f"{platform.architecture()[0]}")


def load_baseline(root: Path) -> tuple[dict[str, dict], Path | None]:
    """Benchmarks of the newest saved run for this machine id, by full name."""
    folder = root / machine_id()
    runs = sorted(folder.glob("[0-9][0-9][0-9][0-9]_*.json"))
    if not runs:
        return {}, None
    data = json.loads(runs[-1].read_text())
    return {b["fullname"]: b for b in data["benchmarks"]}, runs[-1]


def _ratio_cell(extra: dict) -> tuple[str, bool, str | None]:
    if "ratio" not in extra:
        return "—", True, None
    ratio, bound = extra["ratio"], extra["max_ratio"]
    ok = ratio <= bound
    why = None if ok else (f"{extra['ratio_name']}: ratio {ratio:.3f} is above its bound "
                           f"{bound} by {(ratio / bound - 1) * 100:.0f}%")
    return f"{ratio:.3f} (bound {bound})", ok, why


def _tripwire_cell(bench: dict, base: dict | None, tripwire: float) -> tuple[str, str | None]:
    if base is None:
        return "no baseline", None
    change = bench["stats"]["min"] / base["stats"]["min"]
    if change <= tripwire:
        return f"{change:.2f}x", None
    return f"{change:.2f}x drift", (f"{bench['fullname']}: fastest round {change:.2f}x the "
                                    f"baseline's (tripwire {tripwire}x)")


def report(bench_json: Path, baselines: Path = DEFAULT_BASELINES,
           tripwire: float = DEFAULT_TRIPWIRE) -> tuple[str, list[str], list[str]]:
    """The Markdown table, the failed ratio gates and the drifts past the tripwire.

    Returns
    -------
    table : str
    failures : list[str]
        One sentence per in-process ratio above its bound (empty when all held).
    drifts : list[str]
        One sentence per benchmark whose fastest round is more than ``tripwire`` times the
        baseline's; the caller decides whether that fails.
    """
    benches = json.loads(bench_json.read_text())["benchmarks"]
    baseline, source = load_baseline(baselines)
    lines = ["| benchmark | in-process ratio | fastest round (ms) | vs baseline |",
             "|---|---|---:|---:|"]
    failures, drifts, skipped = [], [], []
    for bench in benches:
        ratio, ok_ratio, why_ratio = _ratio_cell(bench.get("extra_info", {}))
        trip, why_trip = _tripwire_cell(bench, baseline.get(bench["fullname"]), tripwire)
        failures += [why_ratio] if why_ratio else []
        drifts += [why_trip] if why_trip else []
        if bench["fullname"] not in baseline:
            skipped.append(bench["name"])
        mark = "" if ok_ratio else " **FAIL**"
        lines.append(f"| {bench['name']}{mark} | {ratio} | {bench['stats']['min'] * 1e3:.2f} "
                     f"| {trip} |")
    where = (f"baseline {source}" if source else
             f"no baseline for machine id {machine_id()} under {baselines}: tripwire skipped")
    lines += ["", f"{len(benches)} benchmarks; {where}; tripwire {tripwire}x on the fastest round."]
    if skipped and source:
        lines.append(f"baseline comparison SKIPPED for {len(skipped)} benchmark(s) absent from "
                     f"{source.name} (save a new baseline to cover them): {', '.join(skipped)}")
    elif skipped:
        lines.append(f"baseline comparison SKIPPED for all {len(skipped)} benchmarks")
    return "\n".join(lines), failures, drifts
