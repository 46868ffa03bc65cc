"""Summaries of a run: medians per (server, phase, length), RULER scores, a Markdown report
(with the agreement and decode agreement tables and gate verdicts) and plots of time to
first token against prompt length and of score against context length."""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path

from sgl_kvtier.eval.gates import gate_name
from sgl_kvtier.eval.paired import POOLS, pool_of

__all__ = ["summarise", "summarise_scores", "markdown", "plot_ttft", "plot_scores"]

Key = tuple[str, str, int]  # server, phase, target prompt tokens


def summarise(records: list[dict]) -> dict[Key, dict]:
    """Median of each latency metric per (server, phase, target length)."""
    groups: dict[Key, list[dict]] = defaultdict(list)
    for r in records:
        if r.get("workload") == "latency":
            groups[(r["server"], r["phase"], r["target_tokens"])].append(r)
    out = {}
    for key, rows in sorted(groups.items()):
        out[key] = {"n": len(rows), "ttft_s": _median(rows, "ttft_s"),
                    "decode_s_per_token": _median(rows, "decode_s_per_token"),
                    "cached_tokens": _median(rows, "cached_tokens"),
                    "prompt_tokens": rows[0]["prompt_tokens"]}
    return out


def _median(rows: list[dict], name: str) -> float:
    return statistics.median(r[name] for r in rows if r[name] is not None)


def summarise_scores(records: list[dict]) -> dict[tuple[str, str, int], dict]:
    """Mean RULER score per (server, task, length), plus the task means as tasks ``"mean"``
    (tasks asked as usual) and ``"mean:decode"`` (question forced through decode)."""
    groups: dict[tuple[str, str, int], list[float]] = defaultdict(list)
    for r in records:
        if r.get("workload") == "ruler":
            groups[(r["server"], r["task"], r["length"])].append(r["score"])
    out = {k: {"score": statistics.fmean(v), "n": len(v)} for k, v in sorted(groups.items())}
    per_length: dict[tuple[str, str, int], list[float]] = defaultdict(list)
    for (server, task, length), row in out.items():
        per_length[(server, pool_of(task), length)].append(row["score"])
    for key, values in per_length.items():
        out[key] = {"score": statistics.fmean(values), "n": len(values)}
    return out


def _score_table(scores: dict[tuple[str, str, int], dict]) -> list[str]:
    columns = sorted({(server, length) for server, _, length in scores})
    tasks = _rows({task for _, task, _ in scores})
    lines = ["| task | " + " | ".join(f"{s} @{n}" for s, n in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for task in tasks:
        cells = [scores.get((s, task, n)) for s, n in columns]
        lines.append(f"| {task} | " + " | ".join(
            "—" if c is None else f"{c['score']:.1f}" + ("" if task in POOLS else f" (n={c['n']})")
            for c in cells) + " |")
    return lines


def _rows(tasks: set[str]) -> list[str]:
    """The tasks, those asked as usual first, then the pooled rows present."""
    return (sorted(tasks - set(POOLS), key=lambda t: (pool_of(t), t))
            + [p for p in POOLS if p in tasks])


def _paired_cell(c: dict) -> str:
    """``diff [low, high] (ref, n)``; one pair has no interval, so none is shown for it."""
    if c["n"] < 2:
        return f"{c['diff']:+.1f}, one pair, no interval (ref {c['reference_score']:.0f})"
    low = " **below**" if c["high"] < 0 else ""
    return (f"{c['diff']:+.1f} [{c['low']:+.1f}, {c['high']:+.1f}]{low} "
            f"(ref {c['reference_score']:.0f}, n={c['n']})")


def _paired_table(paired: dict[tuple[str, str, int], dict]) -> list[str]:
    columns = sorted({(server, length) for server, _, length in paired})
    tasks = _rows({task for _, task, _ in paired})
    lines = ["| task | " + " | ".join(f"{s} @{n}" for s, n in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for task in tasks:
        cells = []
        for s, n in columns:
            c = paired.get((s, task, n))
            cells.append("—" if c is None else _paired_cell(c))
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    return lines


def _agreement_table(agreed: dict[str, dict]) -> list[str]:
    lines = ["| server | reference | positions | top-1 agreement | KL mean (nats) | KL max | "
             "NLL ref | NLL server | greedy identical |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for server, row in agreed.items():
        teacher = (f"{row['positions']} | {row['top1_agreement']:.4f} | {row['kl']:.3g} | "
                   f"{row['kl_max']:.3g} | {row['nll_ref']:.4f} | {row['nll_other']:.4f}"
                   if "positions" in row else "— | — | — | — | — | —")
        greedy = (f"{row['greedy_match'] * row['greedy_prompts']:.0f}/{row['greedy_prompts']}"
                  if "greedy_prompts" in row else "—")
        lines.append(f"| {server} | {row['reference']} | {teacher} | {greedy} |")
    return lines


def _decode_table(decoded: dict[str, dict]) -> list[str]:
    lines = ["| server | reference | prompts x steps | top-1 agreement | disagreeing steps | "
             "reference's margin at each (nats, smallest first) | "
             "KL mean (nats) | KL max | first disagreement (step, per prompt) | "
             "greedy identical | decodes in place (multi-run) / gathered |",
             "|---|---|---:|---:|---:|---|---:|---:|---|---:|---|"]
    for server, row in decoded.items():
        first = ", ".join("—" if f is None else str(f) for f in row["first_disagreement"])
        greedy = ("—" if row["greedy_match"] is None
                  else f"{row['greedy_match'] * row['prompts']:.0f}/{row['prompts']}")
        stats = row["attention_stats"]
        attention = ("— (not kvtier)" if stats is None else
                     f"{stats['decode_in_place']} ({stats.get('decode_multi_run', '?')}) / "
                     f"{stats['decode_gathered']}")
        lines.append(f"| {server} | {row['reference']} | {row['prompts']} x "
                     f"{row['steps'] // row['prompts']} | {row['top1_agreement']:.4f} | "
                     f"{row['disagreements']} | {_margins(row.get('margins'))} | "
                     f"{row['kl']:.3g} | {row['kl_max']:.3g} | "
                     f"{first} | {greedy} | {attention} |")
    return lines


def _margins(margins: list[float] | None, shown: int = 8) -> str:
    if margins is None:  # records from before margins were kept
        return "—"
    if not margins:
        return "none"
    text = ", ".join(f"{m:.2f}" for m in margins[:shown])
    return text + (f", … ({len(margins) - shown} more)" if len(margins) > shown else "")


def _decode_step_table(decoded: dict[str, dict], width: int = 8) -> list[str]:
    servers = list(decoded)
    steps = len(next(iter(decoded.values()))["kl_by_step"])
    lines = ["| steps | " + " | ".join(f"{s} top-1 | {s} KL" for s in servers) + " |",
             "|---|" + "---:|---:|" * len(servers)]
    for a in range(0, steps, width):
        b = min(a + width, steps)
        cells = []
        for s in servers:
            agree, kl = decoded[s]["agree_by_step"][a:b], decoded[s]["kl_by_step"][a:b]
            cells.append(f"{sum(agree) / len(agree):.3f} | {sum(kl) / len(kl):.3g}")
        lines.append(f"| {a + 1}-{b} | " + " | ".join(cells) + " |")
    return lines


def markdown(title: str, summary: dict[Key, dict], verdicts: list[dict], tags: dict,
             complete: bool, scores: dict | None = None, agreed: dict | None = None,
             decoded: dict | None = None, paired: dict | None = None,
             reference: str | None = None) -> str:
    lines = [f"# {title}", ""]
    if not complete:
        lines += ["**INCOMPLETE: the run was interrupted or failed; these numbers are partial.**",
                  ""]
    lines += [f"git {tags['git_commit']} · SGLang {tags['sglang_version']} · "
              f"{tags['hardware']} · run file {tags['config_hash']}", ""]
    if summary:
        lines += ["| server | phase | prompt tokens | cached tokens | TTFT (s) | "
                  "decode (s/token) | n |", "|---|---|---:|---:|---:|---:|---:|"]
    for (server, phase, _), row in summary.items():
        lines.append(f"| {server} | {phase} | {row['prompt_tokens']} | {row['cached_tokens']:.0f} "
                     f"| {row['ttft_s']:.3f} | {row['decode_s_per_token']:.3f} | {row['n']} |")
    if scores:
        lines += ["", "RULER score (string match, 0-100), by task and server @ context length:",
                  "", *_score_table(scores)]
    if paired:
        lines += ["", f"RULER score difference against {reference}, paired sample by sample: "
                  "mean [95 % interval] (reference's mean score; **below**: the whole "
                  "interval is below zero; `mean` pools the tasks asked as usual, "
                  "`mean:decode` those with the question forced through decode):", "",
                  *_paired_table(paired)]
    if agreed:
        lines += ["", "Agreement with the reference server (teacher-forced next-token "
                  "distributions; greedy continuations):", "", *_agreement_table(agreed)]
    if decoded:
        lines += ["", "Greedy decode against the reference teacher-forced on the same tokens "
                  "(top-1 agreement: the server's token is the reference's argmax; KL(ref || "
                  "server) on the reference's top-k plus a tail):", "", *_decode_table(decoded),
                  "", "By step (mean over prompts):", "", *_decode_step_table(decoded)]
    if verdicts:
        lines += ["", "| gate | measured | bound | result |", "|---|---:|---|---|"]
        for v in verdicts:
            value = "—" if v["value"] is None else f"{v['value']:.4g}"
            lines.append(f"| {gate_name(v['gate'])} | {value} | {v['why']} | "
                         f"{'pass' if v['passed'] else 'FAIL'} |")
    return "\n".join(lines) + "\n"


def plot_ttft(summary: dict[Key, dict], path: Path, title: str) -> Path | None:
    """TTFT against prompt length, one line per (server, phase); None if nothing to plot."""
    series: dict[tuple[str, str], list[tuple[int, float]]] = defaultdict(list)
    for (server, phase, length), row in summary.items():
        series[(server, phase)].append((length, row["ttft_s"]))
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter

    # One colour per server configuration, one line style per phase.
    servers = sorted({server for server, _ in series})
    styles = {"cold": "-", "repeat": "--", "shared": "-.", "restart": ":"}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (server, phase), points in sorted(series.items()):
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, marker="o", color=f"C{servers.index(server)}",
                linestyle=styles.get(phase, "-"), label=f"{server} · {phase}")
    ax.set(xlabel="prompt tokens", ylabel="time to first token (s)", title=title, yscale="log")
    for axis_formatter in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
        axis_formatter(FormatStrFormatter("%g"))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_scores(scores: dict[tuple[str, str, int], dict], path: Path, title: str) -> Path | None:
    """Mean RULER score against context length, one colour per server configuration: a solid
    line for the tasks asked as usual, dashed for the question forced through decode."""
    series: dict[tuple[str, str], list[tuple[int, float]]] = defaultdict(list)
    for (server, task, length), row in scores.items():
        if task in POOLS:
            series[(server, task)].append((length, row["score"]))
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colour = {server: f"C{i}" for i, server in enumerate(sorted({s for s, _ in series}))}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (server, pool), points in sorted(series.items()):
        xs, ys = zip(*sorted(points))
        decode = pool == "mean:decode"
        ax.plot(xs, ys, marker="o", color=colour[server], linestyle="--" if decode else "-",
                label=f"{server}, question in decode" if decode else server)
    ax.set(xlabel="context length (tokens)", ylabel="mean score over tasks", title=title,
           ylim=(0, 100), xscale="log", xticks=sorted({x for p in series.values() for x, _ in p}))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%d"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # only the lengths run
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
