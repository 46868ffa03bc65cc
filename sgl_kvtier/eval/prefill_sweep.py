"""The bidirectional-prefill sweep's table and plot, shared by the standalone benchmark
(``eval/bidirectional_standalone.py``) and the server one (``eval/bidirectional_server.py``).

A row is a dict: ``read_limit_mb_s`` (None: uncapped), ``measured_read_mb_s``,
``compute_s``, ``load_s``, ``both_s``, ``bound_s``, ``both_over_bound``, ``both_over_best``,
``split`` and ``correct``.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["HEADER", "row_text", "plot"]

HEADER = ("| read cap (MB/s) | read (MB/s) | compute only (s) | load only (s) | bidirectional (s) "
          "| bound (s) | bidir / bound | bidir / best single | split (tokens) | next token |\n"
          "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")


def row_text(r: dict) -> str:
    cap = "none" if r["read_limit_mb_s"] is None else f"{r['read_limit_mb_s']:.0f}"
    return (f"| {cap} | {r['measured_read_mb_s']:.0f} | {r['compute_s']:.2f} | {r['load_s']:.2f} "
            f"| {r['both_s']:.2f} | {r['bound_s']:.2f} | {r['both_over_bound']:.2f} | "
            f"{r['both_over_best']:.2f} | {r['split']} | "
            f"{'same' if r['correct'] else 'DIFFERENT'} |")


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["measured_read_mb_s"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for key, label in (("compute_s", "compute only"), ("load_s", "load only"),
                       ("both_s", "bidirectional"), ("bound_s", "bound T_c·T_l/(T_c+T_l)")):
        ax.plot(x, [r[key] for r in rows], marker="o", label=label,
                linestyle="--" if key == "bound_s" else "-")
    ax.set_xscale("log")
    ax.set_xlabel("tier read bandwidth, measured (MB/s)")
    ax.set_ylabel("time to first token (s)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
