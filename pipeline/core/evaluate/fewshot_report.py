"""The few-shot results as a person reads them: a CSV for `dvc plots`, a figure and the report's table.

Everything is drawn from metrics/fewshot.json (pipeline/core/heads/fewshot.py writes it), so the `fewshot` stage's
plots and the evaluate stage's report section show the same numbers, and identical metrics give identical bytes.
"""
from __future__ import annotations

import csv
from pathlib import Path

from pipeline.core.heads.fewshot import PROBES
from pipeline.infra.artifacts import atomic_path

SPLITS = ("val", "test")


def _splits(fewshot: dict) -> list[str]:
    return [s for s in SPLITS if s in fewshot["protocol"].get("scored_rows", {})]


def _shots(fewshot: dict) -> list[int]:
    return sorted(int(k) for k in fewshot["results"])


def _probes(fewshot: dict, k: int) -> list[str]:
    """The probes of a k in one fixed order (the JSON file sorts its keys, the stage's own dict does not), so the
    stage's figure and the report's have the same colours."""
    names = list(fewshot["results"][str(k)])
    return sorted(names, key=lambda p: (PROBES.index(p) if p in PROBES else len(PROBES), p))


def write_plot_rows(path: Path, fewshot: dict) -> None:
    """One row per (shots, probe, split): mean accuracy over episodes and its 95 % interval."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["shots", "probe", "split", "accuracy", "ci95_low", "ci95_high"])
        for k in _shots(fewshot):
            for probe in _probes(fewshot, k):
                for split in _splits(fewshot):
                    r = fewshot["results"][str(k)][probe][split]
                    writer.writerow([k, probe, split, f"{r['accuracy']:.6f}", f"{r['accuracy_ci95'][0]:.6f}",
                                     f"{r['accuracy_ci95'][1]:.6f}"])


def plot_fewshot(path: Path, fewshot: dict) -> None:
    """Accuracy against shots per class (log2 axis), one line per probe with its 95 % interval as a band; one panel
    per scored split."""
    from pipeline.core.evaluate.report import plt, save_figure

    splits, shots = _splits(fewshot), _shots(fewshot)
    fig, axes = plt.subplots(1, len(splits), figsize=(4.2 * len(splits), 3.4), squeeze=False, sharey=True)
    for ax, split in zip(axes[0], splits):
        if not shots:
            ax.text(0.5, 0.5, "no k fits the smallest class\n(see `skipped` in metrics/fewshot.json)",
                    ha="center", va="center", transform=ax.transAxes, fontsize=8)
        for probe in _probes(fewshot, shots[0]) if shots else []:
            rows = [fewshot["results"][str(k)][probe][split] for k in shots]
            line, = ax.plot(shots, [r["accuracy"] for r in rows], "o-", label=probe, markersize=4)
            ax.fill_between(shots, [r["accuracy_ci95"][0] for r in rows], [r["accuracy_ci95"][1] for r in rows],
                            color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set_xscale("log", base=2)
        if shots:
            ax.set_xticks(shots, [str(k) for k in shots])
            ax.legend(fontsize=8, loc="lower right")
        ax.set_xlabel("train images per class (shots)")
        ax.set_title(f"{split} ({fewshot['protocol']['scored_rows'][split]} images)", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy (mean over episodes)")
    fig.suptitle(f"few-shot probes, {fewshot['protocol']['episodes']} episodes per k, 95 % t-interval band",
                 fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def _cell(r: dict) -> str:
    return f"{100 * r['accuracy']:.2f} % [{100 * r['accuracy_ci95'][0]:.2f}, {100 * r['accuracy_ci95'][1]:.2f}]"


def fewshot_section(fewshot: dict, figure: str) -> list[str]:
    """The report's "Few-shot" section: one row per (shots, probe), a column per split, the protocol in a line."""
    proto, splits, shots = fewshot["protocol"], _splits(fewshot), _shots(fewshot)
    probes = proto["probes"]
    lines = [
        "## Few-shot (probes on k train images per class)",
        f"{proto['episodes']} episodes per k (seed {proto['seed']}; each episode's seed in `metrics/fewshot.json`), "
        f"draws nested across k, {proto['pooling']} features ({proto['in_features']}). Probes: `logreg` (standardised, "
        f"fixed C = {probes['logreg']['C']:g}), `knn` (cosine, k = min({probes['knn']['k']}, rows), "
        f"T = {probes['knn']['T']:g}), `ncm` (nearest class mean, cosine). Mean accuracy over episodes with its 95 % "
        "t-interval over episodes in brackets (the spread over draws; val and test are scored in full).",
        "",
    ]
    if shots:
        header = ["shots", "probe", *[f"{s} accuracy" for s in splits]]
        rows = [[str(k), f"`{p}`", *[_cell(fewshot["results"][str(k)][p][s]) for s in splits]]
                for k in shots for p in _probes(fewshot, k)]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        lines.append("")
    skipped = sorted(fewshot.get("skipped", {}).items(), key=lambda kv: int(kv[0]))
    lines += [f"> skipped: {k}-shot ({why})" for k, why in skipped]
    lines += ["", f"![few-shot]({figure})", ""]
    return lines
