"""Gates: pass/fail checks on what a run measured.

Three kinds, told apart by ``metric``:

- latency (``ttft_s``, ``decode_s_per_token``): the median of a phase at one prompt length,
  as a ratio to a baseline server (or to another phase: restart against repeat) measured
  in the same run (robust to machine noise), or an absolute bound (only meaningful on a
  dedicated machine);
- RULER ``score``: a task's (or the task mean's) score at one length, absolute or as the
  drop in points from a baseline server;
- agreement (``top1_agreement``, ``kl``, ``greedy_match``): a server against the agreement
  workload's reference server;
- decode agreement (``decode_top1_agreement``, ``decode_kl``, ``decode_greedy_match``): a
  server's greedy decode against the decode_agreement workload's reference, as an absolute
  bound, or against another server's (``baseline``): ``max_ratio`` of the baseline's value
  or ``max_drop`` below it.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["Gate", "LatencyGate", "ScoreGate", "AgreementGate", "DecodeGate", "check_gates",
           "gate_name"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


Phase = Literal["cold", "repeat", "shared", "restart"]


class LatencyGate(_Strict):
    metric: Literal["ttft_s", "decode_s_per_token"]
    phase: Phase
    server: str
    baseline: str | None = None
    baseline_phase: Phase | None = Field(None, description="default: the same phase")
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
        if self.baseline_phase is not None and self.baseline is None:
            raise ValueError("baseline_phase needs a baseline server")
        return self


class ScoreGate(_Strict):
    metric: Literal["score"]
    server: str
    baseline: str | None = None
    task: str = Field("mean", description=(
        "a RULER task, 'mean' (over the run's tasks asked as usual) or 'mean:decode' (over "
        "those asked with the question forced through decode)"))
    length: int
    min_value: float | None = Field(None, ge=0, le=100)
    max_drop: float | None = Field(None, ge=0, description="points below the baseline")

    @model_validator(mode="after")
    def _one_bound(self):
        if (self.min_value is None) == (self.max_drop is None):
            raise ValueError("give exactly one of min_value, max_drop")
        if (self.max_drop is None) != (self.baseline is None):
            raise ValueError("max_drop needs a baseline server; min_value must have none")
        return self


class AgreementGate(_Strict):
    metric: Literal["top1_agreement", "kl", "greedy_match"]
    server: str
    min_value: float | None = None
    max_value: float | None = None

    @model_validator(mode="after")
    def _one_bound(self):
        if (self.min_value is None) == (self.max_value is None):
            raise ValueError("give exactly one of min_value, max_value")
        return self


class DecodeGate(_Strict):
    metric: Literal["decode_top1_agreement", "decode_kl", "decode_greedy_match"]
    server: str
    baseline: str | None = Field(None, description="another server scored the same way")
    min_value: float | None = None
    max_value: float | None = None
    max_ratio: float | None = Field(None, gt=0, description="server / baseline")
    max_drop: float | None = Field(None, ge=0, description="baseline - server")

    @model_validator(mode="after")
    def _one_bound(self):
        bounds = [self.min_value, self.max_value, self.max_ratio, self.max_drop]
        if sum(b is not None for b in bounds) != 1:
            raise ValueError("give exactly one of min_value, max_value, max_ratio, max_drop")
        relative = self.max_ratio is not None or self.max_drop is not None
        if relative != (self.baseline is not None):
            raise ValueError("max_ratio and max_drop need a baseline server; "
                             "min_value and max_value must have none")
        return self


Gate = Annotated[LatencyGate | ScoreGate | AgreementGate | DecodeGate,
                 Field(discriminator="metric")]


def gate_name(gate) -> str:
    base = f" / {gate.baseline}" if getattr(gate, "baseline", None) else ""
    if isinstance(gate, LatencyGate):
        if gate.baseline_phase and gate.baseline_phase != gate.phase:
            base = f" / {gate.baseline} {gate.baseline_phase}"
        return f"{gate.metric} {gate.phase} @{gate.prompt_tokens}: {gate.server}{base}"
    if isinstance(gate, ScoreGate):
        return f"score {gate.task} @{gate.length}: {gate.server}{base}"
    if isinstance(gate, DecodeGate) and gate.max_drop is not None:
        return f"{gate.metric}: {gate.baseline} - {gate.server}"
    return f"{gate.metric}: {gate.server}{base}" + ("" if base else " vs reference")


def _measure(gate, latency: dict, scores: dict, agreement: dict,
             decode: dict) -> float | None:
    if isinstance(gate, LatencyGate):
        row = latency.get((gate.server, gate.phase, gate.prompt_tokens))
        if gate.baseline is None:
            return None if row is None else row[gate.metric]
        base = latency.get((gate.baseline, gate.baseline_phase or gate.phase,
                            gate.prompt_tokens))
        return None if row is None or base is None else row[gate.metric] / base[gate.metric]
    if isinstance(gate, ScoreGate):
        row = scores.get((gate.server, gate.task, gate.length))
        if gate.baseline is None:
            return None if row is None else row["score"]
        base = scores.get((gate.baseline, gate.task, gate.length))
        return None if row is None or base is None else base["score"] - row["score"]
    if isinstance(gate, DecodeGate):
        return _measure_decode(gate, decode)
    row = agreement.get(gate.server)
    return None if row is None or row.get(gate.metric) is None else row[gate.metric]


def _measure_decode(gate: DecodeGate, decode: dict) -> float | None:
    key = gate.metric.removeprefix("decode_")
    value = (decode.get(gate.server) or {}).get(key)
    if gate.baseline is None or value is None:
        return value
    base = (decode.get(gate.baseline) or {}).get(key)
    if base is None:
        return None
    if gate.max_drop is not None:
        return base - value
    if base == 0:  # the baseline equals the reference exactly: only 0 is as good
        return 1.0 if value == 0 else float("inf")
    return value / base


def _bound(gate) -> tuple[str, float]:
    for field, op in (("max_ratio", "<="), ("min_ratio", ">="), ("max_value", "<="),
                      ("min_value", ">="), ("max_drop", "<=")):
        value = getattr(gate, field, None)
        if value is not None:
            return op, value
    raise AssertionError(f"gate without a bound: {gate}")


def check_gates(gates: list, latency: dict, scores: dict | None = None,
                agreement: dict | None = None, decode: dict | None = None) -> list[dict]:
    """One verdict per gate: ``{"gate", "value", "passed", "why"}``.

    ``latency`` maps (server, phase, length) to medians (:func:`report.summarise`),
    ``scores`` (server, task, length) to mean scores, ``agreement`` and ``decode`` a
    server to its agreement with the respective workload's reference server.
    """
    verdicts = []
    for gate in gates:
        value = _measure(gate, latency, scores or {}, agreement or {}, decode or {})
        if value is None:
            verdicts.append({"gate": gate, "value": None, "passed": False,
                             "why": "not measured in this run"})
            continue
        op, bound = _bound(gate)
        passed = value <= bound if op == "<=" else value >= bound
        verdicts.append({"gate": gate, "value": value, "passed": passed, "why": f"{op} {bound}"})
    return verdicts
