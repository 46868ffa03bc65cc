"""The one typed configuration of sgl_kvtier, loaded from YAML.

The file has three sections, each optional::

    tier:     # NVMe tier under SGLang's radix prefix cache
    prefill:  # Cake-style bidirectional prefill
    sparse:   # ShadowKV-style sparse decode

Validation is pydantic's (strict types, unknown keys rejected); this module only turns
its errors into one line that names the file, the key and what was expected.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

__all__ = ["KVTierConfig", "TierConfig", "PrefillConfig", "SparseConfig", "ConfigError",
           "load_config", "parse_size"]

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9,
          "gb": 10**9, "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}
_SIZE_RE = re.compile(r"^\s*(-?[0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")


class ConfigError(ValueError):
    """A configuration mistake, worded as one line for the operator."""


def parse_size(value: Any) -> int:
    """Parse a byte size such as ``4096``, ``"512MiB"`` or ``"10GB"`` into bytes.

    Raises
    ------
    ValueError
        For negative sizes, unknown units and non-size values.
    """
    if isinstance(value, bool):
        raise ValueError("expected a size in bytes or a string like '10GB'")
    if isinstance(value, (int, float)):
        number, unit = float(value), ""
    elif isinstance(value, str) and (m := _SIZE_RE.match(value)):
        number, unit = float(m.group(1)), m.group(2).lower()
    else:
        raise ValueError("expected a size in bytes or a string like '10GB'")
    if unit not in _UNITS:
        raise ValueError(f"unknown size unit {unit!r} (use B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")
    if number < 0:
        raise ValueError("expected a non-negative size")
    return int(number * _UNITS[unit])


Size = Annotated[int, BeforeValidator(parse_size)]


# [layer, KV head]: a YAML list of two (strict validation takes no list as a tuple).
_HeadPair = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=2, max_length=2)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class TierConfig(_Section):
    """NVMe tier: radix-cache prefixes spill to local disk and come back."""

    enabled: bool = False
    path: str = Field("~/.cache/sgl_kvtier/tier", description="directory of chunk files")
    chunk_tokens: int = Field(256, gt=0, description="tokens per chunk file")
    capacity: Size = Field(parse_size("64GiB"), gt=0, description="disk bytes the tier may use")
    admission: Literal["always", "second_hit"] = Field(
        "second_hit", description="write every computed chunk, or only on its second use")
    read_bandwidth_limit: Size | None = Field(None, gt=0, description=(
        "cap on the tier's read rate, bytes/s, to emulate slower storage (benchmarks)"))
    io_threads: int = Field(4, gt=0, le=64, description="chunk reads in flight")
    direct_io: bool = Field(True, description="O_DIRECT reads and writes where allowed")
    async_load: bool = Field(True, description=(
        "load disk hits on a background thread while the scheduler keeps serving; false "
        "reads them inside the scheduler step (the behaviour before, kept for comparison)"))


class PrefillConfig(_Section):
    """Bidirectional prefill: compute from the front while loading from the back."""

    enabled: bool = False
    chunk_tokens: int = Field(512, gt=0, description="tokens per compute chunk")
    min_prefix_tokens: int = Field(1024, ge=0, description="shorter disk hits just load")


class SparseConfig(_Section):
    """Sparse decode: low-rank keys and landmarks on device, values in host memory.

    Sizes are relative to the model and the context (a fraction with a floor and a cap), so
    one file fits a 135M model with 192 key dimensions per layer and an 8B one with 1,024:
    ShadowKV's absolute rank 160 and 2,048-token budget are fractions of 1,024 dimensions and
    128k tokens. :mod:`sgl_kvtier.sparse.budget` turns them into numbers per request.
    """

    enabled: bool = False
    min_context_tokens: int = Field(2048, gt=0, description="shorter contexts stay dense")
    chunk_tokens: int | None = Field(None, gt=0, le=64, description=(
        "tokens per landmark chunk; default: 4 with exact keys, 8 with low-rank keys (whose "
        "device memory the finer landmarks would outgrow)"))
    budget_fraction: float = Field(0.06, gt=0, le=1, description=(
        "tokens selected per KV head per step, as a fraction of the context"))
    budget_min_tokens: int = Field(256, gt=0, description="floor of the selected tokens")
    budget_max_tokens: int = Field(2048, gt=0, description="cap of the selected tokens")
    rank_fraction: float = Field(0.16, gt=0, le=1, description=(
        "rank of the joint pre-RoPE key factors, as a fraction of KV heads x head dim"))
    rank_min: int = Field(32, gt=0, description="floor of that rank")
    keys: Literal["auto", "lowrank", "exact"] = Field("auto", description=(
        "lowrank: ShadowKV's joint pre-RoPE key factors on the device, the selected chunks' "
        "keys rebuilt from them each step; exact: the prompt's post-RoPE keys held off the "
        "pool beside the values and fetched like them (no rank loss and no factors on the "
        "device; twice the host bytes and fetch traffic); auto: exact on a CPU server, "
        "where host and device are one memory and the fetch is a copy, lowrank on a GPU"))
    outlier_fraction: float = Field(0.003, ge=0, le=1, description=(
        "chunks kept dense (least like their landmark), as a fraction of the chunks"))
    outlier_min_chunks: int = Field(4, ge=0, description="floor of the outlier chunks")
    sink_tokens: int = Field(16, ge=0, description="first tokens kept dense")
    local_tokens: int = Field(64, ge=0, description="last prompt tokens kept dense")
    selection: Literal["landmark", "bound"] = Field("landmark", description=(
        "how a query scores a chunk: landmark (ShadowKV: its mean key) or bound (Quest: an "
        "upper bound on q.k from the chunk's per-dimension key min and max; 2x the "
        "landmarks' device memory)"))
    exact_score_heads: list[_HeadPair] = Field(
        default_factory=list, description=(
            "[layer, KV head] pairs whose chunks are scored from their exact keys rather "
            "than landmarks: the copy heads a landmark misses. Each costs one head's dense "
            "q.k per step and keeps that head's prompt keys on the device. Find them with "
            "eval/retrieval_heads.py"))
    dense_answer_tokens: int = Field(4, ge=2, description=(
        "first answer tokens of a long request computed with full attention (the first "
        "comes from the prefill); the request goes sparse at the decode step after. At "
        "least 2: under the overlap scheduler the first decode step may run before the "
        "prompt is offered, so it reads the prompt in place. The first tokens set an "
        "answer's course: 4 rather than 2 win back retrievals a 6 % selection misses "
        "(docs/results/sparse-ruler-8k-dense-start), for 2 more steps over the whole prompt"))
    dense_layers: int = Field(0, ge=0, description=(
        "first layers that attend the whole prompt exactly (its KV copied off the pool), "
        "as Quest keeps layers 0-1 dense"))
    workspace: Size = Field(parse_size("1GiB"), gt=0, description=(
        "device bytes for the selected keys and values of all sparse requests; a request "
        "that finds it full decodes densely"))
    host_memory: Size | None = Field(None, gt=0, description=(
        "host bytes for the prompt states of all sparse requests (their values, and their "
        "keys with exact keys); a request whose new state would not fit decodes densely. "
        "Default: half of the memory this process may use (the machine's, capped by its "
        "memory cgroup's limit)"))
    kernel: Literal["auto", "torch", "triton", "flashinfer"] = Field("auto", description=(
        "auto: FlashInfer + Triton where a GPU has them, PyTorch elsewhere"))

    def resolved(self, device: str) -> SparseConfig:
        """This section with ``keys`` and ``chunk_tokens`` made concrete for a server whose
        model runs on ``device`` (a torch device type: ``"cpu"``, ``"cuda"``)."""
        keys = self.keys if self.keys != "auto" else "exact" if device == "cpu" else "lowrank"
        chunk = self.chunk_tokens or (4 if keys == "exact" else 8)
        return self.model_copy(update={"keys": keys, "chunk_tokens": chunk})

    @property
    def is_resolved(self) -> bool:
        return self.keys != "auto" and self.chunk_tokens is not None

    @model_validator(mode="after")
    def _ordered(self):
        if self.budget_max_tokens < self.budget_min_tokens:
            raise ValueError(f"budget_max_tokens ({self.budget_max_tokens}) is below "
                             f"budget_min_tokens ({self.budget_min_tokens})")
        return self


class KVTierConfig(_Section):
    """Everything ``--kvtier-config FILE.yaml`` can set; every field has a default."""

    tier: TierConfig = TierConfig()
    prefill: PrefillConfig = PrefillConfig()
    sparse: SparseConfig = SparseConfig()

    def features(self) -> list[str]:
        """Names of the enabled sections, in a fixed order."""
        return [name for name in ("tier", "prefill", "sparse") if getattr(self, name).enabled]


def load_config(path: str | Path | None) -> KVTierConfig:
    """Read and validate a kvtier YAML file; ``None`` gives the defaults.

    Raises
    ------
    ConfigError
        One line naming the file, the key and what was expected.
    """
    if path is None:
        return KVTierConfig()
    where = str(path)
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"kvtier config {where}: cannot read the file ({e})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"kvtier config {where}: not valid YAML{line}") from None
    return config_from_dict({} if data is None else data, where)


def config_from_dict(data: Any, where: str = "<dict>") -> KVTierConfig:
    """Validate an already-parsed mapping; see :func:`load_config`."""
    if not isinstance(data, dict):
        raise ConfigError(f"kvtier config {where}: (top level): expected a mapping with "
                          f"sections tier, prefill, sparse; got {type(data).__name__}")
    try:
        config = KVTierConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"kvtier config {where}: {_describe(e)}") from None
    if config.prefill.enabled and not (config.tier.enabled and config.tier.async_load):
        need = "tier.enabled" if not config.tier.enabled else "tier.async_load"
        raise ConfigError(f"kvtier config {where}: prefill.enabled: bidirectional prefill "
                          f"loads from the NVMe tier in the background; it needs {need}: true")
    return config


def _describe(error: ValidationError) -> str:
    first = error.errors()[0]
    key = ".".join(str(part) for part in first["loc"]) or "(top level)"
    if first["type"] == "extra_forbidden":
        parent = first["loc"][:-1]
        model = KVTierConfig
        for part in parent:
            model = model.model_fields[part].annotation
        allowed = ", ".join(model.model_fields)
        what = f"unknown key; expected one of: {allowed}"
    else:
        msg = first["msg"].removeprefix("Value error, ")
        what = f"{msg[0].lower()}{msg[1:]}; got {first['input']!r}"
    more = error.error_count() - 1
    return f"{key}: {what}" + (f" (and {more} more error{'s' * (more > 1)})" if more else "")
