"""``--enable-kvtier`` and ``--kvtier-config`` on SGLang's command line.

Targets (verified on SGLang 0.5.23):

- ``sglang.srt.server_args.ServerArgs.add_cli_args`` (AROUND): adds the two flags, so they
  show in ``launch_server --help`` and work in ``--config`` files.
- ``sglang.srt.server_args.ServerArgs.from_cli_args`` (AFTER): validates the kvtier YAML
  (a mistake ends the process before the model loads), stores the parsed config on the
  record as ``_kvtier`` (underscore attributes survive the pickling into the scheduler
  process), selects the ``kvtier`` attention backend, the ``kvtier`` radix cache when the
  NVMe tier is enabled, and prepares CPU-only hosts.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from sglang.srt.plugins.hook_registry import HookType

from sgl_kvtier import __version__
from sgl_kvtier.config import ConfigError, KVTierConfig, load_config
from sgl_kvtier.patches import _state
from sgl_kvtier.sparse.model_fit import sparse_unfit_reason

log = logging.getLogger("sgl_kvtier")


def _add_cli_args(original, parser: argparse.ArgumentParser, *args, **kwargs):
    result = original(parser, *args, **kwargs)
    group = parser.add_argument_group("sgl_kvtier")
    group.add_argument(
        "--enable-kvtier", action="store_true",
        help="Turn on sgl_kvtier: the kvtier attention backend (prefix-aware dense attention "
             "on CPU, FlashInfer on GPU) plus the features enabled in --kvtier-config. On a "
             "host without an NVIDIA driver and with --device cpu it also provides a "
             "no-device libcuda shim and SGLANG_USE_CPU_ENGINE=1 for the server processes.")
    group.add_argument(
        "--kvtier-config", metavar="FILE.yaml", default=None,
        help="YAML file with the sections tier (NVMe prefix tier), prefill (bidirectional "
             "prefill) and sparse (sparse decode). Unknown keys and wrong types are rejected "
             "before the model loads. Without it every setting has its default. Only read "
             "with --enable-kvtier.")
    return result


def _from_cli_args(server_args, cls, args: argparse.Namespace):
    if not getattr(args, "enable_kvtier", False):
        if getattr(args, "kvtier_config", None):
            log.warning("sgl_kvtier: --kvtier-config is ignored without --enable-kvtier")
        return server_args
    try:
        config = load_config(args.kvtier_config)
        _check_against_server_args(config, args)
    except ConfigError as e:
        print(e, file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    server_args._kvtier = {"config": config.model_dump(), "config_path": args.kvtier_config}
    _select_attention_backend(server_args, args)
    if config.tier.enabled or config.sparse.enabled:
        _select_radix_cache(server_args, args, config)
    if args.device == "cpu":
        _prepare_cpu_host()
    # Spawned SGLang processes re-run the plugin; this tells them kvtier is on before
    # they can see the server arguments.
    os.environ[_state.ENABLE_ENV] = "1"
    _state.mark_enabled()
    log.info("%s", banner(config, server_args))
    return server_args


def _check_against_server_args(config: KVTierConfig, args: argparse.Namespace) -> None:
    """Mistakes only visible next to SGLang's own arguments, before the model loads."""
    page = getattr(args, "page_size", None)
    if config.tier.enabled and page and config.tier.chunk_tokens % page:
        raise ConfigError(f"kvtier config {args.kvtier_config or '(defaults)'}: "
                          f"tier.chunk_tokens: must be a multiple of --page-size {page}; "
                          f"got {config.tier.chunk_tokens}")
    if config.sparse.enabled:
        _check_sparse(config, args)


# SGLang arguments sparse decode cannot serve with, and why (each names the flag).
_SPARSE_CONFLICTS = (
    ("disable_radix_cache", "--disable-radix-cache", "a sparse request hands its prompt "
     "back to the radix cache"),
    ("enable_mixed_chunk", "--enable-mixed-chunk", "mixed batches re-read a decoding "
     "request's prompt from the pool"),
    ("enable_dp_attention", "--enable-dp-attention", "data-parallel attention re-reads a "
     "decoding request's prompt from the pool"),
    ("speculative_algorithm", "--speculative-algorithm", "speculative decoding is not "
     "supported with sparse decode yet"),
)


def _check_sparse(config: KVTierConfig, args: argparse.Namespace) -> None:
    where = f"kvtier config {args.kvtier_config or '(defaults)'}: sparse.enabled"
    for attr, flag, why in _SPARSE_CONFLICTS:
        if getattr(args, attr, None):
            raise ConfigError(f"{where}: cannot be used with {flag} ({why})")
    if (getattr(args, "page_size", None) or 1) > 1:
        raise ConfigError(f"{where}: needs --page-size 1 (got {args.page_size})")
    if (getattr(args, "tp_size", None) or 1) > 1:
        raise ConfigError(f"{where}: needs a single tensor-parallel rank (got --tp "
                          f"{args.tp_size})")
    if args.attention_backend not in (None, "kvtier"):
        raise ConfigError(f"{where}: runs in the kvtier attention backend; "
                          f"--attention-backend {args.attention_backend} was given")
    if getattr(args, "device", None) != "cpu":
        # On a GPU the kvtier backend hands decode to SGLang's FlashInfer backend, which
        # would read the prompt slots a sparse request let go.
        raise ConfigError(f"{where}: runs in the kvtier backend's CPU path in this release "
                          f"(--device cpu); the GPU wiring is not done yet (got --device "
                          f"{getattr(args, 'device', None) or 'auto'})")
    if config.sparse.kernel == "flashinfer":
        raise ConfigError(f"kvtier config {args.kvtier_config or '(defaults)'}: "
                          f"sparse.kernel: flashinfer needs a GPU; this server runs on "
                          f"--device cpu (use auto or torch)")
    hf = _model_config(args)
    if hf is None:
        return  # a hub id not downloaded yet: the backend checks the loaded model's config
    if (why := sparse_unfit_reason(hf)) is not None:
        raise ConfigError(f"{where}: cannot serve {args.model_path}: {why}")
    _check_exact_heads(config, args, hf.get("text_config") or hf)


def _model_config(args: argparse.Namespace) -> dict | None:
    """The model's config.json: from its folder, or for a hub id from the Hugging Face
    cache when it was downloaded before (no network here); None when neither has it."""
    file = Path(str(args.model_path)) / "config.json"
    if not file.is_file():
        file = _cached_hub_file(str(args.model_path), getattr(args, "revision", None))
    return json.loads(file.read_text()) if file is not None else None


def _cached_hub_file(repo: str, revision: str | None) -> Path | None:
    from huggingface_hub import try_to_load_from_cache
    try:
        found = try_to_load_from_cache(repo, "config.json", revision=revision)
    except ValueError:  # not a hub id (a path that is not a model folder, say)
        return None
    return Path(found) if isinstance(found, str) else None


def _check_exact_heads(config: KVTierConfig, args: argparse.Namespace, hf: dict) -> None:
    """sparse.exact_score_heads against the model's layers and KV heads."""
    from sgl_kvtier.sparse.manager import exact_heads_by_layer

    if not config.sparse.exact_score_heads:
        return
    shape = hf["num_hidden_layers"], hf.get("num_key_value_heads", hf["num_attention_heads"])
    try:
        exact_heads_by_layer(config.sparse.exact_score_heads, *shape)
    except ValueError as e:
        raise ConfigError(f"kvtier config {args.kvtier_config or '(defaults)'}: {e}") from None


def _select_attention_backend(server_args, args: argparse.Namespace) -> None:
    chosen = args.attention_backend
    if chosen is None:
        server_args.attention_backend = "kvtier"
    else:
        log.warning("sgl_kvtier: --attention-backend %s given explicitly; the kvtier attention "
                    "backend is not used", chosen)


def _select_radix_cache(server_args, args: argparse.Namespace, config: KVTierConfig) -> None:
    chosen = getattr(args, "radix_cache_backend", None)
    feature = "tier.enabled" if config.tier.enabled else "sparse.enabled"
    if getattr(args, "disable_radix_cache", False):
        log.warning("sgl_kvtier: --disable-radix-cache is given: the NVMe tier has nothing to "
                    "extend and stays off")
    elif chosen not in (None, "kvtier"):
        print(f"sgl_kvtier: {feature} needs the kvtier radix cache; --radix-cache-backend "
              f"{chosen} was given (drop it, or disable the feature)", file=sys.stderr,
              flush=True)
        raise SystemExit(2)
    else:
        server_args.radix_cache_backend = "kvtier"


def _prepare_cpu_host() -> None:
    """Driver shim and CPU-engine switch, for this process and every child it spawns."""
    from sgl_kvtier import cuda_shim

    shim = cuda_shim.activate()
    if shim is not None:
        log.info("sgl_kvtier: no NVIDIA driver found; using the no-device shim %s", shim)
    os.environ["SGLANG_USE_CPU_ENGINE"] = "1"
    # SGLang caches these probes on first use, which happened at import time.
    from sglang.srt.utils import common

    common.is_cpu.cache_clear()


HOOKS = [("sglang.srt.server_args.ServerArgs.add_cli_args", _add_cli_args, HookType.AROUND),
         ("sglang.srt.server_args.ServerArgs.from_cli_args", _from_cli_args, HookType.AFTER)]


def banner(config: KVTierConfig, server_args) -> str:
    from sgl_kvtier.patches._compat import sglang_version

    features = ", ".join(config.features()) or "none"
    attention = getattr(server_args, "attention_backend", None)
    return (f"sgl_kvtier {__version__} on SGLang {sglang_version()}: enabled; attention backend "
            f"{attention}; features: {features}; config "
            f"{server_args._kvtier['config_path'] or '(defaults)'}")
