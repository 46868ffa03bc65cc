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
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sgl_kvtier.config import ConfigError, config_from_dict

__all__ = ["RunSpec", "ServerSpec", "LatencyWorkload", "RulerWorkload", "Gate", "load_spec"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ServerSpec(_Strict):
    """One SGLang server configuration; ``args`` go to ``launch_server`` verbatim."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    args: list[str] = []
    kvtier: dict | None = Field(None, description="inline kvtier config (needs --enable-kvtier)")

    @model_validator(mode="after")
    def _kvtier_valid(self):
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
    max_new_tokens: int | None = Field(None, gt=0, description="default: RULER's per task")

    @model_validator(mode="after")
    def _known_tasks(self):
        from sgl_kvtier.eval.ruler import TASKS

        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown RULER task {unknown[0]!r}; known: {', '.join(TASKS)}")
        return self


Workload = Annotated[LatencyWorkload | RulerWorkload, Field(discriminator="kind")]


class Gate(_Strict):
    """A pass/fail check on the median of a metric, as a ratio to a baseline server when
    ``baseline`` is given (ratios taken in one run are robust to machine noise)."""

    metric: Literal["ttft_s", "decode_s_per_token"]
    phase: Literal["cold", "repeat", "shared", "restart"]
    server: str
    baseline: str | None = None
    prompt_tokens: int
    max_ratio: float | None = Field(None, gt=0)
    min_ratio: float | None = Field(None, gt=0)
    max_value: float | None = None

    @model_validator(mode="after")
    def _one_bound(self):
        bounds = [self.max_ratio, self.min_ratio, self.max_value]
        if sum(b is not None for b in bounds) != 1:
            raise ValueError("give exactly one of max_ratio, min_ratio, max_value")
        if (self.max_value is None) != (self.baseline is not None):
            raise ValueError("ratios need a baseline server; max_value must have none")
        return self


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
        for gate in self.gates:
            for ref in (gate.server, gate.baseline):
                if ref is not None and ref not in names:
                    raise ValueError(f"gate names server {ref!r}; servers are {names}")
        return self

    def digest(self) -> str:
        """Short hash of the whole run file, tagged on every record."""
        text = json.dumps(self.model_dump(), sort_keys=True)
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
        # Drop the union tag pydantic inserts after a workload's index (workloads.0.ruler.x).
        parts = [p for i, p in enumerate(loc)
                 if not (i > 1 and loc[i - 2] == "workloads" and p in ("latency", "ruler"))]
        key = ".".join(str(p) for p in parts) or "(top level)"
        msg = first["msg"].removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            msg = "unknown key"
        elif first["type"] == "union_tag_invalid":
            msg = f"unknown workload kind; this version runs: latency, ruler ({msg})"
        raise ConfigError(f"eval run {path}: {key}: {msg}") from None
