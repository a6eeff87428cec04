"""The ``report`` stage: ``runs/<run>/report/index.html`` and ``report.md``, PNG plots beside them.

Reads what the run left on disk, whatever is there: the eval summary and answers (``eval/``: metrics, judge,
simulated seeker, the ladder and the results by emotion, intent and scene), the corpus report's tagger check
(``corpus/diversity.json``), guidance drift by round (``guidance/drift.json``), and training logs
(``trainer_state.json`` under ``sft/``, ``dpo/``, ``grpo/``). Missing parts are left out with a note, so a
partial run still gets a report.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import jinja2

from toushi.errors import ToushiError
from toushi.store import StageStore, atomic_write_text

TRAIN_STAGES = ("sft", "dpo", "grpo", "distill", "selftrain")
EXAMPLES = 5
# Metric rows of the table: (key in summary["metrics"], label, format, higher is better or None).
METRIC_ROWS = [
    ("chars", "length (chars)", "{:.0f}", None),
    ("tokens", "length (tokens)", "{:.0f}", None),
    ("markdown", "markdown/HTML rate", "{:.0%}", False),
    ("distinct_1", "distinct-1", "{:.2f}", True),
    ("distinct_2", "distinct-2", "{:.2f}", True),
    ("repetition_4", "4-gram repetition", "{:.2f}", False),
    ("jargon", "jargon score", "{:.3f}", False),
    ("lang_match", "language match", "{:.0%}", True),
    ("empty", "empty rate", "{:.0%}", False),
    ("refusal", "refusal rate", "{:.0%}", False),
    ("apology_open", "opens with an apology", "{:.0%}", False),
    ("embed_sim", "embedding sim. to strong", "{:.2f}", True),
]

_env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(str(Path(__file__).parent / "templates" / "report")),
    autoescape=jinja2.select_autoescape(enabled_extensions=("html.j2",), default=False),
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
# Markdown block quote, line by line (answers and posts keep their line breaks).
_env.filters["prepend_quote"] = lambda text: "\n".join("> " + line for line in str(text).split("\n"))


class ReportError(ToushiError, RuntimeError):
    """A run directory the report cannot read; the message names the file."""


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ReportError(f"{path}: not valid JSON: {e}") from None


FACET_TITLES = {"emotion": "emotion", "intent": "intent (what the writer wants)", "scene": "scene"}


def fmt_ci(ci: dict | None, fmt: str = "{:.2f}") -> str:
    """'0.62 [0.51, 0.70]' (or '–' when there is no value)."""
    if not ci or ci.get("mean") is None:
        return "–"
    if ci.get("lo") is None or ci["lo"] == ci["hi"]:
        return fmt.format(ci["mean"])
    return f"{fmt.format(ci['mean'])} [{fmt.format(ci['lo'])}, {fmt.format(ci['hi'])}]"


# --------------------------------------------------------------------------------------- loading


def load_drift(run_dir: Path) -> list[dict]:
    """guidance/drift.json: a list of {"round", "score", ...} (or {"rounds": [...]}); [] when absent."""
    path = run_dir / "guidance" / "drift.json"
    if not path.exists():
        return []
    data = _read_json(path)
    rounds = data.get("rounds", []) if isinstance(data, dict) else data
    if not isinstance(rounds, list) or not all(isinstance(r, dict) and "round" in r and "score" in r for r in rounds):
        raise ReportError(f"{path}: expected a list of {{'round', 'score', ...}} objects")
    return sorted(rounds, key=lambda r: r["round"])


def load_training_logs(run_dir: Path) -> dict[str, list[dict]]:
    """stage -> trainer log_history, from the trainer_state.json with the longest history (the final
    one, or the last checkpoint's when training was interrupted)."""
    logs = {}
    for stage in TRAIN_STAGES:
        best: list[dict] = []
        for path in (run_dir / stage).rglob("trainer_state.json") if (run_dir / stage).is_dir() else []:
            history = _read_json(path).get("log_history") or []
            if len(history) > len(best):
                best = history
        if best:
            logs[stage] = best
    return logs


# --------------------------------------------------------------------------------------- plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    return plt


def plot_win_rates(judge: dict, path: Path) -> Path | None:
    systems = [s for s, v in judge["systems"].items() if v["win_rate"]["mean"] is not None]
    if not systems:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 0.6 * len(systems) + 1.5))
    y = range(len(systems))
    for off, key, label, colour in ((-0.18, "win_rate", "raw", "#4c72b0"), (0.18, "lc_win_rate", "length-controlled", "#dd8452")):
        cis = [judge["systems"][s][key] for s in systems]
        means = [c["mean"] if c["mean"] is not None else 0 for c in cis]
        err = [[m - (c["lo"] if c["lo"] is not None else m) for m, c in zip(means, cis)],
               [(c["hi"] if c["hi"] is not None else m) - m for m, c in zip(means, cis)]]
        ax.barh([i + off for i in y], means, height=0.34, xerr=err, capsize=3, label=label, color=colour)
    ax.axvline(0.5, color="grey", ls="--", lw=1)
    ax.set_yticks(list(y), systems)
    ax.set_xlim(0, 1.02)
    ax.set_xlabel(f"win rate vs {judge['reference']} (95% CI)")
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_ladder(ladder: dict, seeker: dict | None, path: Path) -> Path | None:
    """Left: the seeker's mean change in feeling per rung; right: each step's judge win rate against the rung
    before it. 95% intervals as error bars; a panel without data is left out."""
    rungs = ladder.get("rungs") or []
    seeker_rungs = [r for r in rungs if seeker and (seeker["systems"].get(r) or {}).get("delta", {}).get("mean") is not None]
    judged = [st for st in ladder.get("steps") or [] if st["judge"] and st["judge"]["ci"]["mean"] is not None]
    panels = [p for p, have in (("seeker", seeker_rungs), ("judge", judged)) if have]
    if not panels:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.6), squeeze=False)

    def bars(ax, labels, cis, colour):
        means = [c["mean"] for c in cis]
        err = [[m - c["lo"] for m, c in zip(means, cis)], [c["hi"] - m for m, c in zip(means, cis)]]
        ax.errorbar(range(len(labels)), means, yerr=err, fmt="o-", capsize=4, color=colour)
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")

    for ax, panel in zip(axes[0], panels):
        if panel == "seeker":
            bars(ax, seeker_rungs, [seeker["systems"][r]["delta"] for r in seeker_rungs], "#55a868")
            ax.axhline(0, color="grey", ls="--", lw=1)
            ax.set_ylabel("change in feeling (0-100 scale)")
            ax.set_title("simulated seeker, per rung", fontsize=10)
        else:
            bars(ax, [f"{st['from']}→{st['to']}" for st in judged], [st["judge"]["ci"] for st in judged], "#4c72b0")
            ax.axhline(0.5, color="grey", ls="--", lw=1)
            ax.set_ylim(0, 1)
            ax.set_ylabel("judge win rate vs previous rung")
            ax.set_title("judge, each step", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_lengths(lengths: dict[str, list[int]], path: Path) -> Path | None:
    lengths = {s: v for s, v in lengths.items() if v}
    if not lengths:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    top = max(max(v) for v in lengths.values())
    bins = [top * i / 20 for i in range(21)] if top else 10
    for s, v in lengths.items():
        ax.hist(v, bins=bins, histtype="step", lw=1.6, label=s)
    ax.set_xlabel("answer length (characters)")
    ax.set_ylabel("answers")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_nll(nll: dict, path: Path) -> Path | None:
    if not nll:
        return None
    plt = _plt()
    systems = list(nll)
    means = [nll[s]["mean"] for s in systems]
    err = [[m - nll[s]["lo"] for m, s in zip(means, systems)], [nll[s]["hi"] - m for m, s in zip(means, systems)]]
    fig, ax = plt.subplots(figsize=(6, 0.5 * len(systems) + 1.5))
    ax.barh(systems, means, xerr=err, capsize=3, color="#55a868")
    ax.set_xlabel("per-token NLL of the strong answers (lower is closer to the teacher)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_drift(rounds: list[dict], path: Path) -> Path | None:
    if not rounds:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3))
    xs, ys = [r["round"] for r in rounds], [r["score"] for r in rounds]
    ax.plot(xs, ys, marker="o")
    flagged = [(r["round"], r["score"]) for r in rounds if r.get("flagged")]
    if flagged:
        ax.scatter(*zip(*flagged), color="red", zorder=3, label="flagged")
        ax.legend(fontsize=8)
    ax.set_xlabel("guidance round")
    ax.set_ylabel("drift score")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_training(stage: str, history: list[dict], path: Path) -> Path | None:
    series: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for row in history:
        step = row.get("step")
        for key in ("loss", "eval_loss", "rewards/margins", "rewards/accuracies", "reward"):
            if step is not None and isinstance(row.get(key), (int, float)):
                series[key].append((step, row[key]))
    if not series:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2 if len(series) > 2 else 1, figsize=(9 if len(series) > 2 else 6, 3), squeeze=False)
    for key, pts in series.items():
        ax = axes[0][0] if key in ("loss", "eval_loss") or len(series) <= 2 else axes[0][-1]
        ax.plot(*zip(*pts), marker="." if len(pts) < 50 else None, label=key)
    for ax in axes[0]:
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    fig.suptitle(f"{stage} training")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------- report


def build_report(run_dir: Path, out_dir: Path | None = None, examples: int = EXAMPLES) -> Path:
    """Write index.html, report.md and the PNGs into out_dir (default runs/<run>/report/); return the
    index.html path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: no such run directory")
    out_dir = Path(out_dir or run_dir / "report")
    out_dir.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    eval_store = StageStore(run_dir, "eval")
    summary_path = eval_store.dir / "summary.json"
    summary = _read_json(summary_path) if summary_path.exists() else None
    if summary is None:
        notes.append(f"no eval results ({summary_path} is missing): run the eval stage for metrics and win rates")
    answers = eval_store.records() if summary else []
    systems = summary["systems"] if summary else []

    # key -> file name beside the HTML (None: nothing to draw)
    images: dict[str, str | None] = dict.fromkeys(("win_rates", "lengths", "nll", "drift", "ladder"))

    def keep(key: str, made: Path | None) -> None:
        if made is not None:
            images[key] = made.name

    judge = (summary or {}).get("judge")
    if judge:
        keep("win_rates", plot_win_rates(judge, out_dir / "win_rates.png"))
    seeker = (summary or {}).get("seeker")
    ladder = (summary or {}).get("ladder")
    if ladder:
        keep("ladder", plot_ladder(ladder, seeker, out_dir / "ladder.png"))
    lengths = {s: [a["metrics"]["chars"] for a in answers if a["system"] == s] for s in systems}
    keep("lengths", plot_lengths(lengths, out_dir / "lengths.png"))
    keep("nll", plot_nll((summary or {}).get("nll") or {}, out_dir / "nll.png"))
    drift = load_drift(run_dir)
    keep("drift", plot_drift(drift, out_dir / "drift.png"))
    training = []
    for stage, history in load_training_logs(run_dir).items():
        made = plot_training(stage, history, out_dir / f"training_{stage}.png")
        if made:
            training.append({"stage": stage, "image": made.name, "steps": max(r.get("step", 0) for r in history)})

    # ---- tables
    metric_table = []
    if summary:
        for key, label, fmt, better in METRIC_ROWS:
            cells = [fmt_ci(summary["metrics"].get(s, {}).get(key), fmt) for s in systems]
            if any(c != "–" for c in cells):
                metric_table.append({"label": label, "cells": cells, "better": better})
        nll = summary.get("nll") or {}
        if nll:
            metric_table.append({"label": "held-out NLL of strong answers", "better": False,
                                 "cells": [fmt_ci(nll.get(s), "{:.3f}") for s in systems]})
        trunc = summary.get("truncation") or {}
        if trunc:
            metric_table.append({"label": "truncated answers (cut off at max_tokens)", "better": False, "cells": [
                f"{trunc[s]['rate']:.0%} ({trunc[s]['truncated']}/{trunc[s]['answers']})" if s in trunc else "–"
                for s in systems]})
        if judge:
            for key, label in (("win_rate", f"win rate vs {judge['reference']}"),
                               ("lc_win_rate", f"length-controlled win rate vs {judge['reference']}")):
                metric_table.append({"label": label, "better": True,
                                     "cells": [fmt_ci(judge["systems"].get(s, {}).get(key), "{:.2f}") for s in systems]})
    judge_rows = []
    if judge:
        for s, v in judge["systems"].items():
            judge_rows.append({
                "system": s, "wins": v["wins"], "ties": v["ties"], "losses": v["losses"], "invalid": v["invalid"],
                "consistency": "–" if v["consistency"] is None else f"{v['consistency']:.0%}",
                "win_rate": fmt_ci(v["win_rate"]), "lc_win_rate": fmt_ci(v["lc_win_rate"]),
                "dims": [fmt_ci(v["dims"].get(d)) for d in judge["dimensions"]],
            })

    seeker_rows = []
    if seeker:
        for sys_name in [x for x in systems if x in seeker["systems"]]:
            v = seeker["systems"][sys_name]
            seeker_rows.append({"system": sys_name, "before": fmt_ci(v["before"], "{:.1f}"),
                                "after": fmt_ci(v["after"], "{:.1f}"), "delta": fmt_ci(v["delta"], "{:+.1f}"),
                                "valid": v["valid"], "invalid": v["invalid"]})
    ladder_rows = _ladder_rows(ladder) if ladder else []
    strata = _strata_tables(summary, judge, seeker) if summary else []
    tagger_check = None
    diversity_path = run_dir / "corpus" / "diversity.json"
    if diversity_path.exists():
        tagger_check = _read_json(diversity_path).get("tagger_check")

    # ---- side-by-side examples: the first prompts, every system's answer
    by_prompt: dict[str, dict[str, str]] = defaultdict(dict)
    posts: dict[str, str] = {}
    for a in answers:
        by_prompt[a["prompt_id"]][a["system"]] = a["text"]
        posts[a["prompt_id"]] = a["post"]
    order = (summary or {}).get("prompt_ids") or list(by_prompt)
    example_rows = [
        {"prompt_id": pid, "post": posts[pid],
         "answers": [{"system": s, "text": by_prompt[pid].get(s)} for s in systems if s in by_prompt[pid]]}
        for pid in order[:examples] if pid in by_prompt
    ]

    ctx = {
        "run": run_dir.name, "summary": summary, "systems": systems, "notes": notes + list((summary or {}).get("notes", [])),
        "images": images, "metric_table": metric_table, "judge": judge, "judge_rows": judge_rows,
        "drift": drift, "training": training, "examples": example_rows, "seeker": seeker,
        "seeker_rows": seeker_rows, "ladder": ladder, "ladder_rows": ladder_rows, "strata": strata,
        "min_posts": ((summary or {}).get("strata") or {}).get("min_posts"), "tagger_check": tagger_check,
    }
    html = _env.get_template("index.html.j2").render(**ctx)
    md = _env.get_template("report.md.j2").render(**ctx)
    index = out_dir / "index.html"
    atomic_write_text(index, html)
    atomic_write_text(out_dir / "report.md", md)
    return index


def _ladder_rows(ladder: dict) -> list[dict]:
    """One row per rung in ladder order; every rung after the first carries its step from the rung before."""
    by_to = {st["to"]: st for st in ladder.get("steps") or []}
    rows = []
    for rung in ladder.get("rungs") or []:
        st = by_to.get(rung)
        row = {"rung": rung, "previous": st["from"] if st else None, "judge": "–", "judge_verdict": None,
               "judge_counts": "", "judge_few": False, "seeker": "–", "seeker_verdict": None, "seeker_few": False}
        if st and st["judge"]:
            j = st["judge"]
            row.update(judge=fmt_ci(j["ci"]), judge_verdict=j["verdict"] or "no data",
                       judge_counts=f"{j['wins']}/{j['ties']}/{j['losses']}" + (f", {j['invalid']} invalid" if j["invalid"] else ""),
                       judge_few=j["few"])
        elif st:
            row["judge_verdict"] = "not judged"
        if st and st["seeker"]:
            sk = st["seeker"]
            row.update(seeker=fmt_ci(sk["ci"], "{:+.1f}"), seeker_verdict=sk["verdict"] or "no data", seeker_few=sk["few"])
        elif st:
            row["seeker_verdict"] = "not simulated"
        rows.append(row)
    return rows


def _strata_tables(summary: dict, judge: dict | None, seeker: dict | None) -> list[dict]:
    """Per facet: its cells with the judge win rate and the seeker change per system, and every metric."""
    strata = summary.get("strata") or {}
    systems = summary["systems"]
    out = []
    for facet, cells in (strata.get("facets") or {}).items():
        judged = [s for s in systems if any(s in c["judge"] for c in cells)]
        simulated = [s for s in systems if any(s in c["seeker"] for c in cells)]
        rows = []
        for c in cells:
            metric_rows = []
            for key, label, fmt, better in METRIC_ROWS:
                cis = [(c["metrics"].get(s) or {}).get(key) for s in systems]
                if any(ci and ci.get("mean") is not None for ci in cis):
                    metric_rows.append({"label": label, "better": better, "cells": [fmt_ci(ci, fmt) for ci in cis]})
            rows.append({"value": c["value"], "posts": c["posts"], "few": c["few"],
                         "judge": [fmt_ci(c["judge"].get(s)) + _n(c["judge"].get(s)) for s in judged],
                         "seeker": [fmt_ci(c["seeker"].get(s), "{:+.1f}") + _n(c["seeker"].get(s)) for s in simulated],
                         "metrics": metric_rows})
        out.append({"facet": facet, "title": FACET_TITLES.get(facet, facet), "rows": rows, "judged": judged,
                    "simulated": simulated, "few": sum(c["few"] for c in cells), "cells": len(cells)})
    return out


def _n(ci: dict | None) -> str:
    return f" (n={ci['n']})" if ci and ci.get("n") else ""


def run_stage(ctx) -> dict:
    index = build_report(ctx.run_dir, ctx.store.dir)
    ctx.console.print(f"report: {index}")
    images = sorted(p.name for p in ctx.store.dir.glob("*.png"))
    return {"images": len(images), "path": str(index)}
