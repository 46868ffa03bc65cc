"""The run folder: provenance, JSONL records written as they are measured, completion mark.

A run folder holds ``spec.yaml`` (the run file as given), ``records.jsonl`` (one line per
measurement, each tagged with the run's provenance), ``events.jsonl`` (server starts and
stops), ``logs/`` (server logs), the report files, and ``COMPLETE`` only once everything
finished: a folder without it is partial. A partial folder can be resumed
(:meth:`RunFolder.resume`): its records stay, and the run measures only what they lack.
"""

from __future__ import annotations

import datetime as dt
import functools
import importlib.metadata
import json
import os
import platform
import subprocess
from pathlib import Path

__all__ = ["RunFolder", "provenance"]


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, cwd=Path(__file__).parent, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if out.returncode != 0:
        return "unknown"
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, cwd=Path(__file__).parent)
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _hardware() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f
                       if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpus = os.environ.get("KVTIER_GPU_NAME")  # set by GPU benchmarks that know their device
    return f"{cpu} x{os.cpu_count()}" + (f", {gpus}" if gpus else "")


@functools.cache
def provenance() -> dict:
    """What every record is tagged with, besides the run file's hash."""
    try:
        sglang = importlib.metadata.version("sglang")
    except importlib.metadata.PackageNotFoundError:
        sglang = "not installed"
    return {"git_commit": _git_commit(), "sglang_version": sglang, "hardware": _hardware()}


def _read_records(path: Path, what: str) -> list[dict]:
    """The records of run folder ``path``; a last line cut short by a killed process is
    dropped. Raises ValueError naming ``what`` for a folder without records.jsonl, or a
    line other than the last that is not JSON."""
    if not (path / "records.jsonl").is_file():
        raise ValueError(f"{what} {path}: not a run folder (no records.jsonl)")
    lines = (path / "records.jsonl").read_text().splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise ValueError(f"{what} {path}: records.jsonl line {number} is not "
                                 "JSON (only the last line may be cut short)") from None
    return records


class RunFolder:
    """Append-only records of one run, in ``root/<name>-<timestamp>/``."""

    def __init__(self, root: Path, name: str, spec_text: str, spec_hash: str):
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        path = Path(root) / f"{name}-{stamp}"
        path.mkdir(parents=True, exist_ok=False)
        self._open(path, name, spec_hash, [])
        (self.path / "spec.yaml").write_text(spec_text)

    @classmethod
    def resume(cls, path: Path, name: str, spec_hash: str) -> RunFolder:
        """Reopen the partial run folder ``path`` of the same run file (same hash): its
        records are kept, new ones are appended. A last line cut short by a killed process
        is dropped. Raises ValueError if the folder is complete or of another run file."""
        path = Path(path)
        if (path / "COMPLETE").exists():
            raise ValueError(f"--resume {path}: the run is already complete")
        records = _read_records(path, "--resume")
        hashes = {r.get("config_hash") for r in records}
        if hashes - {spec_hash}:
            raise ValueError(f"--resume {path}: its records are of run file "
                             f"{', '.join(sorted(map(str, hashes)))}, this one is {spec_hash}; "
                             "a resumed run must use the same file")
        (path / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        folder = cls.__new__(cls)
        folder._open(path, name, spec_hash, records)
        folder.event(event="resume", records=len(records), git_commit=folder.tags["git_commit"])
        return folder

    @classmethod
    def read(cls, path: Path) -> RunFolder:
        """A run folder, complete or not, opened to report on its records again; nothing can
        be added to it. Its tags are those its first record was measured with."""
        path = Path(path)
        folder = cls.__new__(cls)
        folder.path, folder._records = path, None
        folder.records = _read_records(path, "report")
        first = folder.records[0] if folder.records else {}
        folder.tags = {key: first.get(key, "unknown") for key in
                       ("run", "config_hash", "git_commit", "sglang_version", "hardware")}
        return folder

    def _open(self, path: Path, name: str, spec_hash: str, records: list[dict]) -> None:
        self.path = path
        (self.path / "logs").mkdir(exist_ok=True)  # not committed with a resumable folder
        self.tags = {"run": name, "config_hash": spec_hash, **provenance()}
        self._records = open(self.path / "records.jsonl", "a")
        self.records: list[dict] = records

    def commits(self) -> list[str]:
        """The git commits the records were measured at, in order (more than one once a
        run was resumed at another commit)."""
        seen = dict.fromkeys(r["git_commit"] for r in self.records if "git_commit" in r)
        return list(seen) or [self.tags["git_commit"]]

    def log_path(self, label: str) -> Path:
        return self.path / "logs" / f"{label}.log"

    def add(self, **record) -> dict:
        record = {**record, **self.tags, "time": dt.datetime.now().isoformat(timespec="seconds")}
        self._records.write(json.dumps(record) + "\n")
        self._records.flush()
        self.records.append(record)
        return record

    def event(self, **fields) -> None:
        """Server starts and stops (pid, port, log), for whoever debugs the run later."""
        stamp = dt.datetime.now().isoformat(timespec="seconds")
        with open(self.path / "events.jsonl", "a") as f:
            f.write(json.dumps({**fields, "time": stamp}) + "\n")

    def write(self, name: str, text: str) -> Path:
        path = self.path / name
        path.write_text(text)
        return path

    def close(self, complete: bool) -> None:
        self._records.close()
        if complete:
            (self.path / "COMPLETE").write_text(self.tags["config_hash"] + "\n")
