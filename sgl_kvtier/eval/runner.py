"""Run an evaluation file: for each server configuration, start the server, run every
workload, stop it; then summarise, check gates, write the report.

A failure or Ctrl-C stops the current server (its whole process group), keeps what was
measured, and marks the run folder incomplete. ``run(..., resume=FOLDER)`` continues such a
folder: RULER samples it already scored are not asked again, and a server with nothing left
to measure is not started (how a run of many hours spans several sittings).
"""

from __future__ import annotations

import itertools
import os
import sys
import time
from pathlib import Path

import yaml
from tqdm import tqdm

from sgl_kvtier.cuda_shim import cpu_engine_env
from sgl_kvtier.eval import accuracy, agreement, decode_agreement, latency, report
from sgl_kvtier.eval.gates import check_gates
from sgl_kvtier.eval.paired import paired_differences
from sgl_kvtier.eval.records import RunFolder
from sgl_kvtier.eval.spec import RunSpec, ServerSpec, load_spec
from sgl_kvtier.harness.prompts import load_tokenizer
from sgl_kvtier.harness.resolve import resolve_model
from sgl_kvtier.harness.server import Server, ServerError

__all__ = ["RunResult", "run"]


class RunResult:
    def __init__(self, folder: RunFolder, verdicts: list[dict], complete: bool):
        self.folder, self.verdicts, self.complete = folder, verdicts, complete

    @property
    def passed(self) -> bool:
        return self.complete and all(v["passed"] for v in self.verdicts)


def _server_args(spec: RunSpec, server: ServerSpec, model_dir: Path,
                 folder: RunFolder) -> list[str]:
    args = [*spec.server_defaults, *server.args, "--model-path", str(model_dir)]
    if _forces_tokens(spec):
        # The processor reads the request's output so far; the overlap scheduler samples a
        # step before it appends the last one, which would force every token twice.
        args += [a for a in ("--enable-custom-logit-processor", "--disable-overlap-schedule")
                 if a not in args]
    if server.kvtier is not None:
        path = folder.path / f"kvtier-{server.name}.yaml"
        path.write_text(yaml.safe_dump(_in_run_folder(server.kvtier, folder.path)))
        args += ["--kvtier-config", str(path)]
    return args


def _forces_tokens(spec: RunSpec) -> bool:
    return any(getattr(w, "question_in_decode", False) and w.forcing == "tokens"
               for w in spec.workloads)


def _in_run_folder(kvtier: dict, run_dir: Path) -> dict:
    """``{run_dir}`` in ``tier.path`` becomes this run's folder: a fresh tier per run, so
    no chunk of an earlier run turns a cold measurement into a disk hit."""
    tier = kvtier.get("tier") or {}
    if "{run_dir}" not in str(tier.get("path", "")):
        return kvtier
    return {**kvtier, "tier": {**tier, "path": tier["path"].replace("{run_dir}", str(run_dir))}}


def _env(args: list[str]) -> dict[str, str]:
    # A stock server on a CPU-only host needs the driver shim given; --enable-kvtier
    # prepares it by itself.
    if "--device" in args and args[args.index("--device") + 1] == "cpu":
        return {**os.environ, **cpu_engine_env()}
    return dict(os.environ)


def _settle_tier(server: Server, timeout: float = 600.0) -> None:
    """Wait until the server's NVMe tier (if any) copied and wrote everything queued, so a
    restart measures what the tier keeps, not what it happened to finish."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = server.server_info().get("internal_states", [{}])
        tier = (states[0].get("kvtier") or {}).get("tier") or {}
        if not tier or (tier["copies_pending"] == 0 and tier["write_queue_depth"] == 0):
            return
        time.sleep(0.2)
    raise ServerError(f"the NVMe tier still had writes queued after {timeout:.0f} s")


def _run_server(spec: RunSpec, group: list[ServerSpec], model_dir: Path, tokenizer,
                folder: RunFolder, bar: tqdm, scored: dict[str, set]) -> None:
    """Start ``group[0]``'s server and measure every entry of ``group`` on it."""
    server_spec = group[0]
    args = _server_args(spec, server_spec, model_dir, folder)
    starts = itertools.count(1)

    def start() -> Server:
        bar.set_postfix_str(f"starting {server_spec.name}")
        label = f"{server_spec.name}-{next(starts)}"
        server = Server(args, folder.log_path(label), env=_env(args))
        folder.event(event="start", server=server_spec.name, port=server.port,
                     log=str(server.log_path))
        server.start()
        folder.event(event="ready", server=server_spec.name, pid=server.proc.pid)
        return server

    def stop() -> None:
        pid = current[0].proc.pid if current[0].proc else None
        current[0].stop()
        folder.event(event="stop", server=server_spec.name, pid=pid)

    current = [start()]

    def restart() -> Server:
        _settle_tier(current[0])
        stop()
        current[0] = start()
        return current[0]

    try:
        for work in spec.workloads:
            bar.set_postfix_str(f"{server_spec.name}: {work.kind}")
            if work.kind == "ruler":
                variants = [accuracy.Variant(s.name, s.request_params, scored.get(s.name, set()))
                            for s in group]
                measured = accuracy.run_ruler(current[0], tokenizer, work, spec.seed, variants)
            else:
                measured = ((server_spec.name, body) for body in
                            _measure(work, current[0], restart, server_spec.name, tokenizer,
                                     folder))
            for name, body in measured:
                folder.add(server=name, **body)
                bar.update()
    finally:
        stop()


def _measure(work, server: Server, restart, name: str, tokenizer, folder: RunFolder):
    """The record bodies of one non-RULER workload on one server."""
    if work.kind == "latency":
        return latency.run_latency(server, restart, tokenizer, work)
    if work.kind == "decode_agreement":
        return decode_agreement.run_decode_agreement(server, name, tokenizer, work,
                                                     folder.path / "raw", folder.records)
    return agreement.run_agreement(server, name, tokenizer, work, folder.path / "raw")


def run(spec: RunSpec, spec_text: str, out_root: Path,
        resume: Path | None = None) -> RunResult:
    """Run every server configuration and workload of ``spec`` into a new run folder, or
    into the partial run folder ``resume`` of the same run file (RULER workloads only)."""
    if resume is not None and (kinds := {w.kind for w in spec.workloads} - {"ruler"}):
        raise ValueError(f"--resume: only RULER workloads can be resumed; {spec.name} has "
                         f"{', '.join(sorted(kinds))}")
    model_dir = resolve_model(spec.model)
    tokenizer = load_tokenizer(model_dir)
    folder = (RunFolder(out_root, spec.name, spec_text, spec.digest()) if resume is None
              else RunFolder.resume(resume, spec.name, spec.digest()))
    workloads = {"latency": latency, "ruler": accuracy, "agreement": agreement,
                 "decode_agreement": decode_agreement}
    # Each server's counters are one step per workload, each entry's samples the rest.
    hosted = sum(s.host is not None for s in spec.servers)
    total = (len(spec.servers) * sum(workloads[w.kind].steps(w) for w in spec.workloads)
             - hosted * len(spec.workloads))
    scored = _scored(folder.records)
    complete = False
    try:
        with tqdm(total=total, desc=spec.name, unit="meas", file=sys.stderr) as bar:
            for group in _server_order(spec):
                bar.update(sum(len(scored.get(s.name, ())) for s in group))
                if resume is not None and all(_nothing_left(spec, scored.get(s.name, set()))
                                              for s in group):
                    bar.update(len(spec.workloads))  # its counters, recorded before
                    continue
                _run_server(spec, group, model_dir, tokenizer, folder, bar, scored)
        for work in spec.workloads:
            if work.kind in ("agreement", "decode_agreement"):
                for body in workloads[work.kind].compare(folder.records, folder.path, work):
                    folder.add(**body)
        complete = True
    finally:
        verdicts = _report(spec, folder, complete)
        folder.close(complete)
    return RunResult(folder, verdicts, complete)


def _scored(records: list[dict]) -> dict[str, set[tuple[str, int, int]]]:
    """Per server, the RULER samples a resumed folder already holds."""
    out: dict[str, set] = {}
    for r in records:
        if r.get("workload") == "ruler":
            out.setdefault(r["server"], set()).add((r["task"], r["length"], r["index"]))
    return out


def _nothing_left(spec: RunSpec, done: set) -> bool:
    return all(accuracy.sample_keys(w) <= done for w in spec.workloads)


def _server_order(spec: RunSpec) -> list[list[ServerSpec]]:
    """The servers to start (each with the entries measured on it, see
    :meth:`RunSpec.groups`) in the run file's order, except that a decode_agreement
    reference goes last: it is teacher-forced on what the other servers generated."""
    refs = {w.reference for w in spec.workloads if w.kind == "decode_agreement"}
    groups = spec.groups()
    return ([g for g in groups if g[0].name not in refs]
            + [g for g in groups if g[0].name in refs])


def report_folder(path: Path) -> tuple[RunFolder, list[dict]]:
    """Write run folder ``path``'s summary.md and plots again from its records and its
    spec.yaml with this checkout's report code (no server is started): a finished run's
    tables as the report now lays them out. Gates are judged only if the run is complete."""
    folder = RunFolder.read(path)
    spec = load_spec(Path(path) / "spec.yaml")
    return folder, _report(spec, folder, (Path(path) / "COMPLETE").exists())


def _report(spec: RunSpec, folder: RunFolder, complete: bool) -> list[dict]:
    """Summary tables, gate verdicts (complete runs only) and plots; returns the verdicts."""
    summary = report.summarise(folder.records)
    scores = report.summarise_scores(folder.records)
    agreed = agreement.summarise_agreement(folder.records)
    decoded = decode_agreement.summarise_decode(folder.records)
    verdicts = check_gates(spec.gates, summary, scores, agreed, decoded) if complete else []
    reference = next((w.reference for w in spec.workloads
                      if w.kind == "ruler" and w.reference is not None), None)
    paired = None if reference is None else paired_differences(folder.records, reference)
    tags = {**folder.tags, "git_commit": " + ".join(folder.commits())}
    folder.write("summary.md", report.markdown(spec.name, summary, verdicts, tags,
                                               complete, scores, agreed, decoded, paired,
                                               reference))
    report.plot_ttft(summary, folder.path / "ttft.png", f"{spec.name}: time to first token")
    report.plot_scores(scores, folder.path / "score.png", f"{spec.name}: RULER score")
    return verdicts
