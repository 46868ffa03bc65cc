"""Sparse decode on one CUDA device at Llama-3.1-8B's attention shapes, against dense decode.

    python eval/sparse_gpu_bench.py --out $OUT          # on the GPU machine, ~6 min on an H200
    .venv/bin/python eval/sparse_gpu_bench.py --smoke   # here, CPU, tiny shapes: checks the script

Four stages, each timed and written to ``gpu_bench.json`` and ``table.md``:

1. ceilings: a device-to-device copy and a pinned host-to-device copy (bytes per second);
2. kernels: the four Triton kernels (and FlashInfer's batch decode on the sparse page table,
   where FlashInfer imports) against their PyTorch references on this device, bfloat16,
   every output poisoned with NaN first; relative error and median time of each;
3. attention step: one layer of a decode step for ``B`` requests of ``T`` tokens, dense
   (FlashInfer's paged decode, or PyTorch SDPA) against sparse (the server's own
   :class:`SparseStep`: per request select, rebuild and fetch, then one paged decode), for
   batches up to the largest each fits in device memory;
4. throughput: step time x layers, plus the layer's projections and MLP at batch ``B``
   (random weights of Llama-3.1-8B's shapes), gives tokens per second at each batch.

Each sparse request gets its own copy of one built layer state (so no request reads another's
landmarks from cache); the host values store is shared, which moves the same bytes over PCIe.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import replace
from pathlib import Path

import torch

from sgl_kvtier.config import SparseConfig
from sgl_kvtier.eval.gpu_cases import dense_decoders, kernel_rows, linear_ms
from sgl_kvtier.sparse.budget import plan_for
from sgl_kvtier.sparse.decode import SparseStep
from sgl_kvtier.sparse.memory import measure_memory
from sgl_kvtier.sparse.request import SparseRequest
from sgl_kvtier.sparse.rope import Rotary, inv_freq
from sgl_kvtier.sparse.state import build_layer_state
from sgl_kvtier.sparse.step_ops import TorchOps, TritonOps
from sgl_kvtier.sparse.workspace import SparseWorkspace

GIB = 2**30
LLAMA = dict(layers=32, kv_heads=8, group=4, head_dim=128, hidden=4096, inter=14336,
             vocab=128256, params=8.03e9, theta=500000.0)
_DEVICE_STATE = ("sink_k", "sink_v", "u", "sv", "landmarks", "selectable", "outlier_ids",
                 "outlier_k", "outlier_v")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.smoke:
        args.contexts, args.batches = [2048], [1]
    dev = torch.device("cpu" if args.smoke else "cuda")
    torch.manual_seed(0)
    report = {"device": _device_name(dev), "torch": torch.__version__,
              "python": platform.python_version(), "args": vars(args) | {"out": str(args.out)}}
    started = time.perf_counter()
    stages = [("ceilings", lambda: ceilings(dev, args.smoke))]
    if not args.skip_kernels:
        stages.append(("kernels", lambda: kernel_checks(dev, args)))
    stages += [(f"steps_{n}", lambda n=n: step_rows(dev, n, args, report.setdefault(
        f"steps_{n}", []))) for n in ([] if args.skip_steps else args.contexts)]
    for name, stage in stages:
        try:  # a failed stage is reported and the next one still measures
            report[name] = stage()
        except Exception as e:
            report.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"
            _log(f"stage {name} failed: {report['errors'][name]}")
        report["seconds"] = round(time.perf_counter() - started, 1)
        _write(report, args.out)
    print(_table(report))
    return 1 if report.get("errors") else 0


def _write(report: dict, out: Path | None) -> None:
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_bench.json").write_text(json.dumps(report, indent=1, default=str))
        (out / "table.md").write_text(_table(report) + "\n")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072],
                   help="prompt tokens per request (default 32k and 128k)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8],
                   help="batches timed besides the largest each fits (default 1 8)")
    p.add_argument("--steps", type=int, default=12, help="timed decode steps per point")
    p.add_argument("--reserve-gib", type=float, default=6.0,
                   help="device memory kept free for activations and the allocator (GiB)")
    p.add_argument("--host-gib", type=float, default=128.0,
                   help="host memory of the machine, for the host-bound batch (GiB)")
    p.add_argument("--no-flashinfer", action="store_true", help="skip FlashInfer")
    p.add_argument("--variants", nargs="+", choices=_VARIANTS, default=list(_VARIANTS),
                   help="sparse step variants, ops+attention: triton ops score, rebuild and fetch "
                   "with the kernels, torch ops run the references; "
                   "attention by FlashInfer, the Triton kernel or the PyTorch reference "
                   "(default: all four; a CPU runs torch+torch)")
    p.add_argument("--skip-kernels", action="store_true", help="skip the kernel checks")
    p.add_argument("--skip-steps", action="store_true", help="skip the decode steps")
    p.add_argument("--smoke", action="store_true",
                   help="CPU, tiny shapes: checks the script runs, measures nothing")
    p.add_argument("--out", type=Path, help="folder for gpu_bench.json and table.md")
    return p


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu ({platform.processor() or platform.machine()})"


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn, dev: torch.device, reps: int, warmup: int = 2) -> float:
    """Median wall milliseconds of ``fn()`` with the device drained around each call (host
    time included: the sparse step's host work is part of its cost)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        _sync(dev)
        start = time.perf_counter()
        fn()
        _sync(dev)
        times.append(1e3 * (time.perf_counter() - start))
    return sorted(times)[len(times) // 2]


def ceilings(dev: torch.device, smoke: bool) -> dict:
    """Device copy and pinned host-to-device copy bandwidth, GB/s (bytes read + written for
    the device copy, bytes moved for the host copy)."""
    n = (1 if smoke else 2048) * 2**20
    x = torch.randint(0, 255, (n,), dtype=torch.uint8, device=dev)
    y = torch.empty_like(x)
    d2d = timed(lambda: y.copy_(x), dev, 10)
    host = torch.randint(0, 255, (n // 2,), dtype=torch.uint8)
    host = host.pin_memory() if dev.type == "cuda" else host
    h2d = timed(lambda: y[:n // 2].copy_(host, non_blocking=True), dev, 10)
    return {"copy_gbs": round(2 * n / d2d / 1e6, 1), "host_to_device_gbs":
            round(n / 2 / h2d / 1e6, 1)}


def _shapes(smoke: bool) -> dict:
    if smoke:
        return dict(LLAMA, layers=2, kv_heads=2, group=2, head_dim=64, hidden=256, inter=512,
                    vocab=1000, params=1e6)
    return LLAMA


def kernel_checks(dev: torch.device, args) -> list[dict]:
    """Each Triton kernel (and FlashInfer) against its PyTorch reference, bf16, with times."""
    rows = kernel_rows(dev, _shapes(args.smoke), 2048 if args.smoke else 131072,
                       flashinfer=not args.no_flashinfer and dev.type == "cuda")
    for row in rows:
        _log(f"kernel {row}")
    return rows


def _state_copy(state, dev):
    """A layer state with its own device buffers (same values) and the shared host values."""
    return replace(state, **{name: getattr(state, name).clone() for name in _DEVICE_STATE})


def step_rows(dev: torch.device, context: int, args, rows: list[dict]) -> list[dict]:
    """Dense and sparse per-layer step times at ``context`` for each batch, appended to
    ``rows`` as they are measured."""
    s = _shapes(args.smoke)
    h, g, d = s["kv_heads"], s["group"], s["head_dim"]
    config = SparseConfig(enabled=True).resolved("cuda")  # a GPU server's, also in --smoke
    if args.smoke:
        config = config.model_copy(update={"budget_min_tokens": 64, "local_tokens": 16})
    plan = plan_for(config, context, h, d)
    memory = measure_memory(config, context, s["layers"], h, d)
    caps = _capacities(dev, context, memory, s, args)
    _log(f"context {context}: plan {plan}, capacities {caps}")
    rotary = Rotary(d, inv_freq(d, s["theta"]))
    k, v = _prompt(context, h, d, rotary, dev)
    start = time.perf_counter()
    base = build_layer_state(k, v, plan, rotary, device=dev)
    build_ms = 1e3 * (time.perf_counter() - start)
    local = [(k[plan.shared:], v[plan.shared:])]
    common = dict(build_ms_one_layer=round(build_ms, 1), plan=str(plan),
                  **{f"cap_{name}": c for name, c in caps.items()})
    dense_batches = sorted({b for b in args.batches if b <= caps["dense"]} | {caps["dense"]})
    sparse_batches = sorted({b for b in args.batches if b <= caps["sparse_device"]}
                            | {caps["sparse_host"], caps["sparse_device"]})
    kv_bytes = 2 * context * h * d * 2
    for b in dense_batches:
        flashinfer = dev.type == "cuda" and not args.no_flashinfer
        for name, ms in dense_decoders(dev, context, h, g, d, b, flashinfer):
            rows.append(_row(context, "dense", name, b, ms, linear_ms(dev, s, b), s) | common)
            rows[-1]["kv_read_gbs"] = round(b * kv_bytes / ms / 1e6, 1) if ms == ms else None
            _log(f"step {rows[-1]}")
    for b in sparse_batches:
        try:
            states = [_state_copy(base, dev) for _ in range(b)]
        except torch.cuda.OutOfMemoryError as e:
            rows.append({"context": context, "mode": "sparse", "batch": b, "error": str(e)[:300]})
            continue
        for ops, attend_name in _sparse_variants(dev, args):
            for regime in ("steady", "cold"):
                try:
                    ms, stats, busy = _sparse_ms(dev, states, plan, rotary, local, ops,
                                                 attend_name, regime, h * g, d, args.steps)
                except Exception as e:  # e.g. FlashInfer missing: the other variants run
                    rows.append({"context": context, "mode": "sparse", "batch": b,
                                 "kernel": f"{ops.name}+{attend_name}",
                                 "error": f"{type(e).__name__}: {e}"[:300]})
                    _log(f"step failed {rows[-1]}")
                    break
                row = _row(context, "sparse", f"{ops.name}+{attend_name}", b, ms,
                           linear_ms(dev, s, b), s) | common
                row.update(regime=regime, hit_rate=round(stats.hit_rate, 3),
                           device_busy_layer_ms=busy,
                           gathered_mib_per_step=round(stats.gathered_bytes / 2**20
                                                       / max(args.steps, 1), 2))
                rows.append(row)
                _log(f"step {row}")
        del states
    return rows


def _prompt(t: int, h: int, d: int, rotary: Rotary, dev: torch.device):
    """Post-RoPE keys with a low-rank pre-RoPE part (as real keys have) and random values."""
    basis = torch.randn(64, h * d, device=dev)
    k_pre = (torch.randn(t, 64, device=dev) @ basis).view(t, h, d) / 8
    k_pre += 0.1 * torch.randn(t, h, d, device=dev)
    k = rotary.apply(k_pre, torch.arange(t, device=dev)).to(torch.bfloat16)
    return k, torch.randn(t, h, d, device=dev).to(torch.bfloat16)


def _capacities(dev, context, memory, s, args) -> dict:
    """Largest batch each mode fits: device memory after the weights, and host memory."""
    total = (torch.cuda.mem_get_info(dev)[1] if dev.type == "cuda" else 24 * GIB)
    free = total - 2 * s["params"] - args.reserve_gib * GIB
    dense = 2 * context * s["layers"] * s["kv_heads"] * s["head_dim"] * 2
    if args.smoke:
        return {"dense": 2, "sparse_device": 3, "sparse_host": 2}
    return {"dense": max(1, int(free // dense)),
            "sparse_device": max(1, int(free // memory.device_total)),
            "sparse_host": max(1, int(0.9 * args.host_gib * GIB // memory.host))}


_VARIANTS = ("triton+flashinfer", "torch+flashinfer", "triton+triton", "torch+torch")


def _sparse_variants(dev, args):
    """(ops, attention name) pairs to time, from ``--variants`` (``ops+attention``)."""
    names = args.variants if dev.type == "cuda" else ["torch+torch"]
    if args.no_flashinfer:
        names = [n for n in names if not n.endswith("flashinfer")]
    ops = {"triton": TritonOps(), "torch": TorchOps()}
    return [(ops[n.split("+")[0]], n.split("+")[1]) for n in names]


def _attend(name: str, dev: torch.device):
    from sgl_kvtier.sparse.backend import resolve_kernel
    return resolve_kernel(name, dev)[1]


def _sparse_ms(dev, states, plan, rotary, local, ops, attend_name, regime, hq, d, steps):
    """Median per-layer step time of ``len(states)`` sparse requests (one layer)."""
    b = len(states)
    ws = SparseWorkspace(1, d, b * states[0].sv.shape[0] * (plan.dense + plan.selected),
                         torch.bfloat16, dev)
    requests = [SparseRequest([st], plan, ws, rotary, local, ops=ops) for st in states]
    step = SparseStep(requests, _attend(attend_name, dev))
    fixed = torch.randn(b, hq, d, device=dev, dtype=torch.bfloat16)
    scale = d ** -0.5

    def one():
        q = fixed if regime == "steady" else torch.randn_like(fixed)
        step.run(0, q, scale)

    one()  # fills the workspace: the steady regime then hits every chunk
    for r in requests:
        r.stats = type(r.stats)()
    ms = timed(one, dev, steps, warmup=0)
    total = type(requests[0].stats)()
    for r in requests:
        total.add(r.stats)
    return ms, total, device_ms(one, dev)


def device_ms(fn, dev: torch.device, reps: int = 3) -> float | None:
    """Milliseconds per call the device spends in kernels and copies (the profiler's sum),
    i.e. the step's cost without the host's launches and waits; None off CUDA."""
    if dev.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize(dev)
    total_us = sum(getattr(e, "self_device_time_total", 0) for e in prof.key_averages())
    return round(total_us / 1e3 / reps, 4)


def _row(context, mode, kernel, batch, attn_ms, lin_ms, s) -> dict:
    step_ms = s["layers"] * (attn_ms + lin_ms)
    return {"context": context, "mode": mode, "kernel": kernel, "batch": batch,
            "attention_layer_ms": round(attn_ms, 3), "linear_layer_ms": round(lin_ms, 3),
            "step_ms": round(step_ms, 2), "tokens_per_s": round(1e3 * batch / step_ms, 1)}


def _table(report: dict) -> str:
    c = report.get("ceilings", {})
    lines = [f"Device: {report['device']}; torch {report['torch']}; "
             f"copy {c.get('copy_gbs')} GB/s, pinned host->device "
             f"{c.get('host_to_device_gbs')} GB/s",
             "", "| kernel | shape | rel. error | ms | reference ms |", "|---|---|---:|---:|---:|"]
    for k in report.get("kernels", []):
        lines.append(f"| {k['kernel']} | {k['shape']} | {k['rel_error']:.1e} | {k['ms']} | "
                     f"{k['reference_ms']} |")
    lines += ["", "| context | mode | kernel | regime | batch | attention ms/layer | "
              "device-busy ms/layer | linear ms/layer | step ms | tokens/s | hit rate |",
              "|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    steps = [r for key, rows in report.items() if key.startswith("steps_") for r in rows]
    for r in steps:
        if "error" in r:
            lines.append(f"| {r['context']} | {r['mode']} | {r.get('kernel', '')} | failed: "
                         f"{r['error'][:120]} | {r['batch']} | | | | | | |")
            continue
        lines.append(f"| {r['context']} | {r['mode']} | {r['kernel']} | {r.get('regime', '')} "
                     f"| {r['batch']} | {r['attention_layer_ms']} | "
                     f"{r.get('device_busy_layer_ms') or ''} | {r['linear_layer_ms']} | "
                     f"{r['step_ms']} | {r['tokens_per_s']} | {r.get('hit_rate', '')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
