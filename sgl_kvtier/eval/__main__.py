"""``python -m sgl_kvtier.eval run FILE.yaml``, ``report FOLDER``, ``list`` and
``perf BENCH.json``."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

import yaml

from sgl_kvtier.config import ConfigError
from sgl_kvtier.eval.spec import load_spec
from sgl_kvtier.harness.server import ServerError

DEFAULT_CONFIGS = Path("eval/configs")


def _list(directory: Path) -> int:
    files = sorted(directory.glob("*.yaml"))
    if not files:
        print(f"no run files in {directory}", file=sys.stderr)
        return 1
    for path in files:
        try:
            description = (yaml.safe_load(path.read_text()) or {}).get("description", "")
        except yaml.YAMLError:
            description = "(not valid YAML)"
        print(f"{path}  {description.strip().splitlines()[0] if description else ''}")
    return 0


def _run(path: Path, out: Path, resume: Path | None) -> int:
    from sgl_kvtier.eval.runner import run

    try:
        spec = load_spec(path)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    def terminate(signum, frame):
        raise KeyboardInterrupt  # SIGTERM cleans up like Ctrl-C: servers stopped, run marked

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        result = run(spec, path.read_text(), out, resume)
    except KeyboardInterrupt:
        print("interrupted: servers stopped; the run folder is marked incomplete (continue "
              "it with --resume FOLDER)", file=sys.stderr)
        return 130
    except (ServerError, FileNotFoundError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    print((result.folder.path / "summary.md").read_text())
    print(f"run folder: {result.folder.path}")
    failed = [v for v in result.verdicts if not v["passed"]]
    if failed:
        print(f"{len(failed)} gate(s) failed", file=sys.stderr)
        return 1
    return 0


def _report(folder: Path) -> int:
    from sgl_kvtier.eval.runner import report_folder

    try:
        result, verdicts = report_folder(folder)
    except (ConfigError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print((result.path / "summary.md").read_text())
    failed = [v for v in verdicts if not v["passed"]]
    if failed:
        print(f"{len(failed)} gate(s) failed", file=sys.stderr)
    return 1 if failed else 0


def _perf(bench_json: Path, baselines: Path, tripwire: float, fail_on_drift: bool) -> int:
    from sgl_kvtier.eval.perf import report

    if not bench_json.is_file():
        print(f"perf: no benchmark results at {bench_json} (pytest ended before writing "
              f"them; see its output above)", file=sys.stderr)
        return 1
    table, failures, drifts = report(bench_json, baselines, tripwire)
    print(table)
    for why in failures:
        print(f"perf: FAILED: {why}", file=sys.stderr)
    for why in drifts:
        verdict = "FAILED" if fail_on_drift else "DRIFT (absolute time, not gated)"
        print(f"perf: {verdict}: {why}", file=sys.stderr)
    return 1 if failures or (fail_on_drift and drifts) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sgl_kvtier.eval",
        description="Evaluation runs from YAML: start each server configuration, run the "
                    "workloads, write JSONL records, a Markdown summary and plots.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="run one evaluation file")
    p_run.add_argument("file", type=Path, help="the run file, e.g. eval/configs/quickstart.yaml")
    p_run.add_argument("--out", type=Path, default=Path("runs"),
                       help="folder that receives the run folder (default: ./runs)")
    p_run.add_argument("--resume", type=Path, metavar="FOLDER",
                       help="continue this incomplete run folder of the same run file: the "
                            "RULER samples it holds are kept and not asked again (RULER "
                            "workloads only)")
    p_report = sub.add_parser(
        "report", help="write a run folder's summary.md and plots again from its records",
        description="Rewrite summary.md, score.png and ttft.png of a run folder from its "
                    "records.jsonl and spec.yaml with this checkout's report code: no server "
                    "is started and no record is added. Gates are judged only for a complete "
                    "run; exit status 1 if one fails.")
    p_report.add_argument("folder", type=Path, help="a run folder, e.g. runs/quickstart-2026…")
    p_list = sub.add_parser("list", help="list the run files and their descriptions")
    p_list.add_argument("--dir", type=Path, default=DEFAULT_CONFIGS,
                        help=f"folder of run files (default: {DEFAULT_CONFIGS})")
    p_perf = sub.add_parser(
        "perf", help="report the CI performance checks from a pytest --benchmark-json file",
        description="One line per benchmark: the in-process ratio against its reference path "
                    "with its bound, and the fastest round against the committed baseline. "
                    "Exit status 1 if a ratio is above its bound; absolute times are only "
                    "reported (a DRIFT line past the tripwire) unless --fail-on-drift.")
    p_perf.add_argument("bench_json", type=Path, help="file written by --benchmark-json")
    p_perf.add_argument("--baselines", type=Path, default=Path("eval/baselines"),
                        help="pytest-benchmark storage holding the committed baseline "
                             "(default: eval/baselines)")
    p_perf.add_argument("--tripwire", type=float, default=2.0,
                        help="flag a benchmark whose fastest round is this many times the "
                             "baseline's (default: 2.0)")
    p_perf.add_argument("--fail-on-drift", action="store_true",
                        help="also fail on those flags: only meaningful on the idle machine "
                             "the baseline was saved on, never in CI (shared machines)")
    args = parser.parse_args(argv)
    if args.command == "list":
        return _list(args.dir)
    if args.command == "report":
        return _report(args.folder)
    if args.command == "perf":
        return _perf(args.bench_json, args.baselines, args.tripwire, args.fail_on_drift)
    return _run(args.file, args.out, args.resume)


if __name__ == "__main__":
    sys.exit(main())
