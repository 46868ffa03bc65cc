"""The evaluation run file: which model, which server configurations, which workloads, which
gates. Strict like the kvtier config: unknown keys and wrong types are refused, naming the key.

Example (``eval/configs/quickstart.yaml``)::

    name: quickstart
    model: smollm2
    server_defaults: [--device, cpu, --dtype, float32, --sleep-on-idle]
    servers:
      - {name: torch_native, args: [--attention-backend, torch_native]}
      - {name: kvtier, args: [--enable-kvtier], kvtier: {}}
    workloads:
      - {kind: latency, lengths: [1024, 2048], decode_tokens: 16}
    gates:
      - {metric: ttft_s, phase: repeat, server: kvtier, baseline: torch_native,
         prompt_tokens: 2048, max_ratio: 0.5}

Gates are described in :mod:`sgl_kvtier.eval.gates`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sgl_kvtier.config import ConfigError, config_from_dict
from sgl_kvtier.eval.gates import AgreementGate, DecodeGate, Gate, ScoreGate
from sgl_kvtier.request_options import option_error

__all__ = ["RunSpec", "ServerSpec", "LatencyWorkload", "RulerWorkload", "AgreementWorkload",
           "DecodeAgreementWorkload", "load_spec"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ServerSpec(_Strict):
    """One configuration measured: a SGLang server (``args`` go to ``launch_server``
    verbatim), or, with ``host``, requests with their own ``request_params`` on another
    entry's server (RULER only: each prompt is prefilled once for every entry on that
    server, and each is then asked with its own parameters)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    args: list[str] = []
    kvtier: dict | None = Field(None, description="inline kvtier config (needs --enable-kvtier)")
    host: str | None = Field(None, description=(
        "measure on the named entry's server instead of starting one (no args, no kvtier)"))
    request_params: dict = Field({}, description=(
        "custom_params of every request, e.g. {kvtier_sparse_budget: 0.03} or "
        "{kvtier_sparse: false}"))

    @model_validator(mode="after")
    def _kvtier_valid(self):
        if self.host is not None and (self.args or self.kvtier is not None):
            raise ValueError(f"server {self.name} runs on {self.host}'s server: it takes no "
                             f"args or kvtier of its own")
        if (why := option_error(self.request_params)) is not None:
            raise ValueError(f"server {self.name}: request_params: {why}")
        taken = {"--port", "--host", "--model-path", "--kvtier-config"} & set(self.args)
        if taken:
            raise ValueError(f"{sorted(taken)[0]} is set by the runner; remove it from args")
        if self.kvtier is not None:
            if "--enable-kvtier" not in self.args:
                raise ValueError("a kvtier config needs --enable-kvtier in args")
            try:
                config_from_dict(self.kvtier, where=f"server {self.name}")
            except ConfigError as e:
                raise ValueError(str(e)) from None
        return self


class LatencyWorkload(_Strict):
    """Time to first token and decode rate: cold, repeated, shared prefix, after restart."""

    kind: Literal["latency"]
    lengths: list[int] = Field(min_length=1)
    shared_prefix_tokens: int = Field(0, ge=0, description="prefix shared by distinct prompts")
    repeats: int = Field(1, gt=0)
    decode_tokens: int = Field(16, gt=0)
    restart: bool = Field(True, description="also measure after a server restart")

    @model_validator(mode="after")
    def _lengths_positive(self):
        if min(self.lengths) <= self.shared_prefix_tokens:
            raise ValueError("every length must exceed shared_prefix_tokens")
        return self


class RulerWorkload(_Strict):
    """RULER-style accuracy: the named tasks at each context length."""

    kind: Literal["ruler"]
    tasks: list[str] = Field(min_length=1)
    lengths: list[int] = Field(min_length=1)
    num_samples: int = Field(10, gt=0)
    indices: list[int] | None = Field(None, min_length=1, description=(
        "score only these samples of the num_samples (0-based): a second look at chosen "
        "samples of a larger run with the same seed, which are the same prompts"))
    max_new_tokens: int | None = Field(None, gt=0, description="default: RULER's per task")
    reference: str | None = Field(None, description=(
        "server the others are compared with sample by sample: the paired difference of "
        "scores per task and length, with its 95 % interval"))
    question_in_decode: bool = Field(False, description=(
        "niah tasks only: the prompt ends with the haystack, and the question is forced "
        "through decode steps (Quest's protocol), so attention over the haystack while the "
        "answer is generated must find the needle from decode queries; recorded as task "
        "'<task>:decode'"))
    forcing: Literal["tokens", "regex"] = Field("tokens", description=(
        "with question_in_decode: 'tokens' forces the question's own tokens, one per decode "
        "step, as Quest does (a custom logit processor; the runner starts the servers with "
        "--enable-custom-logit-processor --disable-overlap-schedule); 'regex' constrains "
        "the output to the question's text, which lets the model choose its tokenization "
        "(and spell it worse when it attends less)"))

    @model_validator(mode="after")
    def _known_tasks(self):
        from sgl_kvtier.eval.ruler import TASKS

        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown RULER task {unknown[0]!r}; known: {', '.join(TASKS)}")
        if self.indices and (out := [i for i in self.indices
                                     if not 0 <= i < self.num_samples]):
            raise ValueError(f"indices: {out[0]} is not a sample index below num_samples "
                             f"({self.num_samples})")
        if self.question_in_decode and (other := [t for t in self.tasks
                                                  if not t.startswith("niah")]):
            raise ValueError(f"question_in_decode takes niah tasks only; got {other[0]!r}")
        return self


class AgreementWorkload(_Strict):
    """Do two configurations compute the same thing? Every server is compared with
    ``reference``: teacher-forced next-token distributions over long essay texts (top-1
    agreement, KL divergence, negative log-likelihood) and greedy continuations of essay
    prompts (exact match)."""

    kind: Literal["agreement"]
    reference: str = Field(description="server the others are compared with")
    lengths: list[int] = Field(min_length=1, description="teacher-forced text lengths")
    texts: int = Field(2, gt=0, description="texts per length")
    top_k: int = Field(20, gt=0, le=100, description="logprobs kept per position for KL")
    cached_prefix: float = Field(0.5, ge=0, lt=1, description=(
        "fraction of each text prefilled (so cached) first and not scored: the rest is "
        "scored as an extend over a cached prefix"))
    greedy_prompts: int = Field(4, ge=0)
    greedy_prompt_tokens: int = Field(1024, gt=0)
    greedy_tokens: int = Field(32, gt=0)


class DecodeAgreementWorkload(_Strict):
    """How far does each server's greedy decode stray from ``reference``'s distributions?
    Every other server generates ``decode_tokens`` greedily after essay prompts, with its
    top-k log-probabilities per step; ``reference`` is then teacher-forced on those tokens
    and each step is scored (top-1 agreement, KL). See :mod:`sgl_kvtier.eval.decode_agreement`."""

    kind: Literal["decode_agreement"]
    reference: str = Field(description="server the others are compared with (runs last)")
    prompt_tokens: list[int] = Field(min_length=1, description="prompt lengths")
    prompts: int | list[int] = Field(5, description="prompts per length: one count, or one "
                                                    "per entry of prompt_tokens")
    decode_tokens: int = Field(64, ge=24, le=1024, description=(
        "greedy steps per prompt; at least 24, since divergence builds up over steps"))
    top_k: int = Field(20, gt=0, le=100, description="logprobs kept per step for KL")
    slot_runs: int = Field(3, ge=1, le=8, description=(
        "runs of KV pool slots each prompt is stored in: its first parts are sent as "
        "prompts of their own, each followed by an unrelated one, so prefix caching leaves "
        "gaps (1: no fragmenting; 8: the most kvtier attends in place)"))

    @model_validator(mode="after")
    def _counts(self):
        counts = self.prompt_counts()
        if len(counts) != len(self.prompt_tokens) or min(counts) < 1:
            raise ValueError("prompts: give one positive count, or one per prompt_tokens entry")
        if min(self.prompt_tokens) < 2 * self.slot_runs:
            raise ValueError("every prompt length must be at least 2 * slot_runs")
        return self

    def prompt_counts(self) -> list[int]:
        if isinstance(self.prompts, int):
            return [self.prompts] * len(self.prompt_tokens)
        return list(self.prompts)


Workload = Annotated[LatencyWorkload | RulerWorkload | AgreementWorkload |
                     DecodeAgreementWorkload, Field(discriminator="kind")]


class RunSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    model: str = "smollm2"
    seed: int = 42
    server_defaults: list[str] = []
    servers: list[ServerSpec] = Field(min_length=1)
    workloads: list[Workload] = Field(min_length=1)
    gates: list[Gate] = []

    @model_validator(mode="after")
    def _names(self):
        names = [s.name for s in self.servers]
        if len(set(names)) != len(names):
            raise ValueError(f"server names must be unique: {names}")
        refs = [(f"gate {i}", g.server) for i, g in enumerate(self.gates)]
        refs += [(f"gate {i}", g.baseline) for i, g in enumerate(self.gates)
                 if getattr(g, "baseline", None) is not None]
        refs += [(f"{w.kind} reference", w.reference) for w in self.workloads
                 if w.kind in ("agreement", "decode_agreement", "ruler")
                 and w.reference is not None]
        for what, ref in refs:
            if ref not in names:
                raise ValueError(f"{what} names server {ref!r}; servers are {names}")
        self._hosts_valid(names)
        self._gates_have_workloads()
        return self

    def _hosts_valid(self, names: list[str]) -> None:
        hosts = {s.name: s.host for s in self.servers}
        for server in self.servers:
            if server.host is None:
                continue
            if server.host not in names:
                raise ValueError(f"server {server.name} names host {server.host!r}; servers "
                                 f"are {names}")
            if hosts[server.host] is not None:
                raise ValueError(f"server {server.name}'s host {server.host!r} runs on "
                                 f"another server itself")
            if other := [w.kind for w in self.workloads if w.kind != "ruler"]:
                raise ValueError(f"server {server.name} runs on {server.host}'s server, which "
                                 f"only RULER workloads do; this run file has {other[0]}")

    def groups(self) -> list[list[ServerSpec]]:
        """The servers to start, each with the entries measured on it (itself first)."""
        return [[s, *(o for o in self.servers if o.host == s.name)]
                for s in self.servers if s.host is None]

    def _gates_have_workloads(self) -> None:
        kinds = [w.kind for w in self.workloads]
        for kind in ("agreement", "decode_agreement"):
            if kinds.count(kind) > 1:
                raise ValueError(f"at most one {kind} workload per run file")
        decode = next((w for w in self.workloads if w.kind == "decode_agreement"), None)
        if decode is not None and len(self.servers) < 2:
            raise ValueError("a decode_agreement workload needs a server besides its reference")
        for gate in self.gates:
            if isinstance(gate, AgreementGate) and "agreement" not in kinds:
                raise ValueError(f"gate on {gate.metric} needs an agreement workload")
            if isinstance(gate, DecodeGate) and decode is None:
                raise ValueError(f"gate on {gate.metric} needs a decode_agreement workload")
            if isinstance(gate, DecodeGate) and decode.reference in (gate.server, gate.baseline):
                raise ValueError(f"gate on {gate.metric} compares the reference server "
                                 f"{decode.reference!r}, which is not scored against itself")
            if isinstance(gate, ScoreGate):
                tasks = {t for w in self.workloads if w.kind == "ruler" for t in w.tasks}
                if gate.task not in ("mean", "mean:decode") and gate.task not in tasks:
                    raise ValueError(f"score gate on task {gate.task!r}, which no ruler "
                                     f"workload runs")

    def digest(self) -> str:
        """Short hash of what the run file measures (all of it but its description), tagged
        on every record; a resumed run must have the same."""
        text = json.dumps(self.model_dump(exclude={"description"}), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def load_spec(path: str | Path) -> RunSpec:
    """Read a run file; any mistake raises :class:`ConfigError` as one line."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"eval run {path}: cannot read the file ({e})") from None
    except yaml.YAMLError:
        raise ConfigError(f"eval run {path}: not valid YAML") from None
    try:
        return RunSpec.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        loc = first["loc"]
        # Drop the union tag pydantic inserts after a list index (workloads.0.ruler.x).
        parts = [p for i, p in enumerate(loc)
                 if not (i > 1 and loc[i - 2] in ("workloads", "gates") and isinstance(p, str))]
        key = ".".join(str(p) for p in parts) or "(top level)"
        msg = first["msg"].removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            msg = "unknown key"
        elif first["type"] == "union_tag_invalid" and loc[0] == "workloads":
            msg = (f"unknown workload kind; this version runs: latency, ruler, agreement, "
                   f"decode_agreement ({msg})")
        elif first["type"] == "union_tag_invalid":
            msg = f"unknown gate metric ({msg})"
        raise ConfigError(f"eval run {path}: {key}: {msg}") from None
