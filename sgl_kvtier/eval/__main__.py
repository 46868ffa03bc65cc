"""``python -m sgl_kvtier.eval run FILE.yaml`` and ``python -m sgl_kvtier.eval list``."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

import yaml

from sgl_kvtier.config import ConfigError
from sgl_kvtier.eval.spec import load_spec
from sgl_kvtier.server import ServerError

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


def _run(path: Path, out: Path) -> int:
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
        result = run(spec, path.read_text(), out)
    except KeyboardInterrupt:
        print("interrupted: servers stopped; the run folder is marked incomplete", file=sys.stderr)
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
    p_list = sub.add_parser("list", help="list the run files and their descriptions")
    p_list.add_argument("--dir", type=Path, default=DEFAULT_CONFIGS,
                        help=f"folder of run files (default: {DEFAULT_CONFIGS})")
    args = parser.parse_args(argv)
    if args.command == "list":
        return _list(args.dir)
    return _run(args.file, args.out)


if __name__ == "__main__":
    sys.exit(main())
