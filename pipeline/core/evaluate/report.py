"""Pictures and a human-readable report of a pipeline run, written by the evaluate stage.

Everything here is a pure function of the run's artefacts (no host names, no times, no speeds), so identical runs
write identical bytes and a fresh `dvc repro` leaves `git status` clean; times, speeds and machines are in the run
log (`runs/`), which the report points to.
Figures are PNGs drawn with matplotlib's Agg backend and no metadata, for the same reason.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI; also keeps the bytes independent of the desktop
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pipeline.infra.artifacts import atomic_path  # noqa: E402

_PNG = {"format": "png", "dpi": 100, "metadata": {"Software": None}}


def save_figure(fig, path: Path) -> None:
    """Writes a figure as a metadata-free PNG (atomic) and closes it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, **_PNG)
    plt.close(fig)


CONFUSION_CELLS_MAX = 30  # up to this many classes every cell is labelled with its count; above, colour only


def plot_confusion(path: Path, matrix: np.ndarray, classes: Sequence[str], title: str) -> None:
    """Counts per (actual, predicted). Up to CONFUSION_CELLS_MAX classes: every cell numbered, every class named.
    Above: rows normalised to recall (so a large class does not wash out the others), a square figure of fixed size,
    about 25 class names per axis, and no cell text: the report lists the most confused pairs in a table instead."""
    n = len(classes)
    large = n > CONFUSION_CELLS_MAX
    side = 12.0 if large else 1.0 + 0.45 * max(n, 4)
    fig, ax = plt.subplots(figsize=(side + 0.2, side))
    shown = matrix / np.maximum(matrix.sum(1, keepdims=True), 1) if large else matrix
    im = ax.imshow(shown, cmap="Blues", interpolation="nearest")
    if large:
        fig.colorbar(im, ax=ax, fraction=0.04, label="fraction of the actual class")
        ticks = list(range(0, n, max(1, n // 25)))
    else:
        ticks = list(range(n))
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if matrix[i, j] > matrix.max() / 2 else "black")
    ax.set_xticks(ticks, [classes[t] for t in ticks], rotation=90 if n > 6 else 0, fontsize=8 if large else None)
    ax.set_yticks(ticks, [classes[t] for t in ticks], fontsize=8 if large else None)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title(f"{title}\naccuracy {np.trace(matrix) / max(matrix.sum(), 1):.4f}", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def most_confused(matrix: np.ndarray, classes: Sequence[str], top: int = 10) -> list[list]:
    """The largest off-diagonal cells: [actual, predicted, count, fraction of the actual class], largest first."""
    off = matrix.copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(-off, axis=None, kind="stable")[:top]
    return [[classes[i], classes[j], int(off[i, j]), off[i, j] / max(int(matrix[i].sum()), 1)]
            for i, j in (np.unravel_index(k, off.shape) for k in order) if off[i, j] > 0]


def plot_heads(path: Path, ranking: list[dict]) -> None:
    """Val accuracy per head, as horizontal bars, best on top."""
    names = [r["head"] for r in ranking][::-1]
    acc = [r["val_accuracy"] for r in ranking][::-1]
    fig, ax = plt.subplots(figsize=(5, 0.6 + 0.5 * len(names)))
    bars = ax.barh(names, acc, color="tab:blue")
    ax.bar_label(bars, labels=[f"{a:.4f}" for a in acc], padding=3, fontsize=8)
    ax.set_xlim(min(acc) - 0.1 if min(acc) > 0.1 else 0, 1.0)
    ax.set_xlabel("val accuracy")
    ax.set_title("heads on cached features", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def plot_curves(path: Path, history: list[dict]) -> None:
    """Fine-tune loss and val accuracy per epoch; epoch 0 is the warm start (the head's own val numbers)."""
    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(8, 3))
    train = [(h["epoch"], h["train_loss"]) for h in history if h.get("train_loss") is not None]
    if train:
        ax1.plot(*zip(*train), "o-", label="train loss")
    ax1.plot(epochs, [h["val_loss"] for h in history], "o-", label="val loss")
    ax1.set_xlabel("epoch")
    ax1.legend(fontsize=8)
    ax2.plot(epochs, [h["val_accuracy"] for h in history], "o-", color="tab:green")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("val accuracy")
    fig.suptitle("fine-tune (epoch 0 = warm start from the head)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def plot_misclassified(path: Path, images: list[np.ndarray], titles: list[str], header: str) -> None:
    """A grid of misclassified images (uint8 HxWx3), each titled 'true -> predicted'."""
    n = max(len(images), 1)
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.6 * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, im, t in zip(axes.flat, images, titles):
        ax.imshow(im, interpolation="nearest")
        ax.set_title(t, fontsize=8)
    if not images:
        axes[0, 0].text(0.5, 0.5, "no misclassified images", ha="center", va="center")
    fig.suptitle(header, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def _table(header: Sequence[str], rows: list[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f} %"


def _ci(interval: list[float] | None) -> str:
    """A Wilson 95 % interval in percent, `[91.20, 94.51]`; "-" when the metrics predate intervals."""
    return "-" if not interval else f"[{100 * interval[0]:.2f}, {100 * interval[1]:.2f}]"


def _with_ci(scores: dict, key: str) -> str:
    """A proportion of a split's metrics with its interval (key `<key>_ci95`) when it has one."""
    interval = scores.get(f"{key}_ci95")
    return _pct(scores.get(key)) + (f" {_ci(interval)}" if interval else "")


def _data_section(meta: dict) -> list[str]:
    classes = meta["classes"]
    counts = meta.get("counts", {})
    splits = [s for s in ("train", "val", "test") if s in counts]
    data_rows = [[c] + [counts[s].get(c, 0) for s in splits] for c in classes]
    data_rows.append(["**total**"] + [sum(counts[s].values()) for s in splits])
    skipped = meta.get("skipped", 0)
    skipped_n = len(skipped) if isinstance(skipped, list) else skipped
    return [
        "## Data",
        f"Source `{meta.get('source')}`: {len(classes)} classes, {skipped_n} files skipped "
        "(listed with reasons in `data/prepared/skipped.csv`).",
        "",
        _table(["class", *splits], data_rows),
        "",
        *[f"> warning: {w}" for w in meta.get("warnings", [])],
        "",
    ]


def _backbone_section(attrs: dict) -> list[str]:
    pre = json.loads(attrs["preprocess"]) if isinstance(attrs.get("preprocess"), str) else attrs.get("preprocess", {})
    return [
        "## Backbone",
        f"`{attrs['backbone']}`, weights `{attrs['weights']}` (sha256 `{attrs['weights_sha256'][:16]}...`), "
        f"{attrs['precision']} extraction stored as {attrs['dtype']}, {attrs['num_features']} features per pooling "
        f"(avg, max), {attrs.get('pre_logits_features', attrs['num_features'])} pre-logits features; last map "
        f"{attrs.get('feature_layout', 'NCHW')}.",
        f"Preprocessing: resize {pre.get('resize')} ({pre.get('interpolation')}), crop {pre.get('size')} "
        f"({pre.get('crop_mode', 'center')}), "
        f"mean {pre.get('mean')}, std {pre.get('std')}.",
        "",
    ]


def _heads_section(selected: dict, figures: dict[str, str]) -> list[str]:
    interval = f" {selected['interval'][0].upper()}{selected['interval'][1:]}." if selected.get("interval") else ""
    warm = selected.get("warm_start_head")
    start = (f" The fine-tune warm-starts from **{warm}** ({selected['warm_start_reason']})."
             if warm and warm != selected["head"] else "")
    return [
        "## Heads (fitted on cached features)",
        _table(["head", "val accuracy", "95 % interval (Wilson)", "val loss"],
               [[f"`{r['head']}`", _pct(r["val_accuracy"]), _ci(r.get("val_accuracy_ci95")), f"{r['val_loss']:.4f}"]
                for r in selected["ranking"]]),
        "",
        f"Selected: **{selected['head']}** ({selected['reason']}).{interval}{start}",
        "",
        f"![heads]({figures['heads']})",
        "",
    ]


_KEPT = {
    "last": "`finetune.select: last`: the last epoch, unless the warm start scores better on val",
    "accuracy": "`finetune.select: accuracy`: the best val accuracy, ties to the lower loss",
    "loss": "`finetune.select: loss`: the lowest val loss",
}


def _averaged(ft: dict) -> str:
    """What the validated and kept weights are when averaging is on: not one epoch's last step."""
    if ft.get("swa_start", 0) > 0:
        return (f"; the weights validated and kept are the uniform average (SWA) of every step from "
                f"{ft['swa_start']:g} of the run on, not the last step's")
    if ft.get("ema_decay", 0) > 0:
        return f"; the weights validated and kept are an exponential moving average (decay {ft['ema_decay']:g})"
    return ""


def _finetune_section(info: dict, figures: dict[str, str]) -> list[str]:
    ft = info["finetune"]
    parity = info.get("parity")
    start = (f"Warm-started from `{info['warm_start']}`; parity check on val: max |logit difference| "
             f"{parity['max_abs_logit_diff']:.2e}, argmax flips {_pct(parity['argmax_flip_fraction'])}."
             if parity else "Started from a randomly initialised head (`finetune.warm_start: false`).")
    return [
        "## Fine-tune (LP-FT)",
        f"{start} {ft['epochs']} epochs, head lr {ft['lr']}, "
        f"body lr x{ft['body_lr_ratio']}, BatchNorm `{ft['bn']}`; kept: epoch {info['best_epoch']} "
        f"(epoch 0 = the warm start itself; {_KEPT.get(ft.get('select', 'last'), '')}){_averaged(ft)}.",
        "",
        _table(["epoch", "train loss", "val loss", "val accuracy"],
               [[h["epoch"], "-" if h.get("train_loss") is None else f"{h['train_loss']:.4f}",
                 f"{h['val_loss']:.4f}", _pct(h["val_accuracy"])] for h in info["history"]]),
        "",
        f"![fine-tune curves]({figures['curves']})",
        "",
    ]


def _result_section(result: dict, figures: dict[str, str]) -> list[str]:
    evals = [s for s in ("val", "test") if s in result["best_head"]]
    best_head = result["best_head"]
    scored = [(f"head `{best_head['name']}`", best_head)]
    if "finetune" in result:
        scored.append(("fine-tuned network", result["finetune"]))
    extra = [k for k in ("balanced_accuracy", "top5_accuracy") if all(k in m[evals[0]] for _, m in scored)]
    models = [[name] + [_with_ci(m[s], "accuracy") for s in evals] + [_with_ci(m[evals[0]], k) for k in extra]
              for name, m in scored]
    # compare the numbers, never their text ("100.00 %" < "99.00 %" as strings); ties go to the simpler model
    best = max(scored, key=lambda nm: (nm[1][evals[0]]["accuracy"], -scored.index(nm)))[0]
    return [
        "## Result",
        "Accuracies with their Wilson 95 % intervals in brackets (balanced accuracy: Wilson at the classes' effective "
        "size, pipeline/core/heads/intervals.py).",
        "",
        _table(["model", *[f"{s} accuracy" for s in evals],
                *[f"{evals[0]} {k.replace('_', ' ').replace('top5', 'top-5')}" for k in extra]], models),
        "",
        f"Best on val: **{best}**.",
        "",
        *_per_class_section(result, result.get("per_class_split", evals[-1])),
        *[f"![{name}]({fig})" for name, fig in figures.items() if name.startswith("confusion")],
        "",
        f"![misclassified]({figures['misclassified']})",
        "",
    ]


def _per_class_section(result: dict, split: str, worst: int = 10) -> list[str]:
    """Per-class precision and recall of the best model: every class up to 30, else the `worst` by recall."""
    model = result.get("finetune", result["best_head"])
    per_class, classes = model[split].get("per_class"), result.get("classes")
    if not per_class or not classes:
        return []
    order = list(range(len(classes)))
    title = f"Per class on {split} ({'fine-tuned network' if 'finetune' in result else 'best head'})"
    if len(classes) > CONFUSION_CELLS_MAX:
        order = sorted(order, key=lambda i: (per_class["recall"][i], i))[:worst]
        title += f": the {worst} classes with the lowest recall"
    rows = [[classes[i], _pct(per_class["precision"][i]), _pct(per_class["recall"][i]), per_class["support"][i]]
            for i in order]
    confused = result.get("most_confused") or []
    lines = [f"### {title}", _table(["class", "precision", "recall", "images"], rows), ""]
    if confused:
        lines += ["Most confused pairs (actual -> predicted):",
                  _table(["actual", "predicted", "images", "of the actual class"],
                         [[a, p, c, _pct(f)] for a, p, c, f in confused]), ""]
    return lines


_HEADER = [
    "# Pipeline report",
    "",
    "Written by the `evaluate` stage from the run's artefacts only. Wall times, speeds, machine and package versions "
    "of each stage are in the run log, `runs/<DVC stage>.json` (not tracked by git or DVC, so identical runs keep "
    "identical files).",
    "",
]
_REPRODUCE = [
    "## Reproduce",
    "```",
    "git clone <this repository> && cd <it>",
    "make repro          # installs requirements.lock into .venv, then runs `dvc repro`",
    ".venv/bin/python -m pipeline.verify   # compares the outputs with the committed ones",
    ".venv/bin/python -m pipeline.summary   # the headline numbers (all of them: dvc metrics show)",
    "```",
    "",
]


def write_markdown(path: Path, *, meta: dict, attrs: dict, selected: dict, result: dict, finetune_info: dict | None,
                   figures: dict[str, str], extra: Sequence[str] = ()) -> None:
    """report.md: data, backbone, heads, fine-tune, best model, figures, how to reproduce.

    `extra`: the lines of further sections, placed after the result (the few-shot section,
    pipeline/core/evaluate/fewshot_report.py, which imports this module and so is composed by the caller).
    """
    parts = [*_HEADER, *_data_section(meta), *_backbone_section(attrs), *_heads_section(selected, figures)]
    if finetune_info is not None:
        parts += _finetune_section(finetune_info, figures)
    parts += [*_result_section(result, figures), *extra, *_REPRODUCE]
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(parts))
