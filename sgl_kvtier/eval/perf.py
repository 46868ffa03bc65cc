"""The CI performance report: ``python -m sgl_kvtier.eval perf BENCH.json``.

Reads the ``--benchmark-json`` file of a pytest run and says, one line per benchmark,

- the ratio each test measured in-process against its reference path and the bound
  written next to the test (the gate that matters; the test itself fails on it too);
- the fastest round now against the committed baseline (``eval/baselines``, written with
  ``--benchmark-save``): a loose tripwire only, because absolute times on shared machines
  move by tens of percent.

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


def _tripwire_cell(bench: dict, base: dict | None, tripwire: float) -> tuple[str, bool, str | None]:
    if base is None:
        return "no baseline", True, None
    change = bench["stats"]["min"] / base["stats"]["min"]
    ok = change <= tripwire
    why = None if ok else (f"{bench['fullname']}: fastest round {change:.2f}x the baseline's "
                           f"(tripwire {tripwire}x)")
    return f"{change:.2f}x", ok, why


def report(bench_json: Path, baselines: Path = DEFAULT_BASELINES,
           tripwire: float = DEFAULT_TRIPWIRE) -> tuple[str, list[str]]:
    """The Markdown table and the list of failures (empty when everything held)."""
    benches = json.loads(bench_json.read_text())["benchmarks"]
    baseline, source = load_baseline(baselines)
    lines = ["| benchmark | in-process ratio | fastest round (ms) | vs baseline |",
             "|---|---|---:|---:|"]
    failures, skipped = [], []
    for bench in benches:
        ratio, ok_ratio, why_ratio = _ratio_cell(bench.get("extra_info", {}))
        trip, ok_trip, why_trip = _tripwire_cell(bench, baseline.get(bench["fullname"]),
                                                 tripwire)
        failures += [w for w in (why_ratio, why_trip) if w]
        if bench["fullname"] not in baseline:
            skipped.append(bench["name"])
        mark = "" if ok_ratio and ok_trip else " **FAIL**"
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
    return "\n".join(lines), failures
