"""Results as tables and plots: the report of a run (report.md, report.json), training curves.

    table(results, teacher="teacher", out_dir=)   markdown table of evaluation rows (+ files)
    plot_curves(metrics_jsonl, out_png)           loss and Rouge-L against step
    retention(student, teacher)                   the share of the teacher's score kept
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from kdjax.data import DataError
from kdjax.evaluate import ROUGE_KEYS


def retention(student_score: float, teacher_score: float) -> float:
    """Teacher retention = student score / teacher score (1.0 = the teacher's score kept whole)."""
    if not teacher_score > 0:
        raise ValueError(f"retention: the teacher score is {teacher_score}; it must be > 0 to divide by")
    return float(student_score) / float(teacher_score)


def _fmt(value, std=None, digits=2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    text = f"{value:.{digits}f}"
    return f"{text} ± {std:.{digits}f}" if std else text


def comparison(kd: Mapping[str, Any], sft: Mapping[str, Any]) -> dict:
    """KD against the number it must beat, the same student fine-tuned on the data alone:
    differences (KD - SFT) of Rouge-L, its Unicode variant and the validation loss, whether KD
    wins on both Rouge-L and loss, and a sentence that says so plainly."""
    d = {k: float(kd[k]) - float(sft[k]) for k in ("rougeL", "rougeL_unicode", "loss") if k in kd and k in sft}
    wins = d.get("rougeL", 0.0) > 0 and d.get("loss", 0.0) < 0
    gap = f"Rouge-L {d.get('rougeL', 0):+.2f} (unicode {d.get('rougeL_unicode', 0):+.2f}), val loss {d.get('loss', 0):+.4f}"
    d.update(kd_wins=wins, text=(f"KD beats plain fine-tuning of the same student: {gap}." if wins else
                                 f"KD does NOT beat plain fine-tuning of the same student: {gap} (KD - SFT)."))
    return d


def stages_table(stages: Mapping[str, Mapping[str, Any]]) -> str:
    """The budget of each stage of a run: steps, rows, wall time."""
    lines = ["| stage | steps | rows | wall time |", "|---|---|---|---|"]
    for name, s in stages.items():
        lines.append(f"| {name} | {s['steps']} | {s['rows']} | {s['seconds']:.0f} s |")
    return "\n".join(lines) + "\n"


def table(results: Mapping[str, Mapping[str, Any]], *, teacher: str | None = "teacher",
          out_dir: str | None = None, extra: Mapping[str, Any] | None = None) -> str:
    """A markdown table of evaluation results, one row per model, in the given order.

    results: model name -> a dict with any of "rougeL", "rougeL_std", "rougeL_unicode",
    "rougeL_unicode_std", "loss", "perplexity" (what `evaluate` returns), "size_bytes" (a size column
    when any row has it: kdjax.quant.report.served_bytes). Retention (%) =
    100 * retention(model's Rouge-L, teacher row's Rouge-L), for both variants, when `teacher` names
    a row of `results` with a positive score. With out_dir, writes report.md and report.json (the
    results with "retention" / "retention_unicode" added as fractions) there.
    """
    results = {name: dict(r) for name, r in results.items()}
    if teacher is not None and teacher not in results:
        teacher = None  # no teacher row: no retention column values
    for r in results.values():
        for key, ret_key in (("rougeL", "retention"), ("rougeL_unicode", "retention_unicode")):
            t = results[teacher].get(key) if teacher else None
            r[ret_key] = retention(r[key], t) if t and t > 0 and r.get(key) is not None else None
    sizes = any("size_bytes" in r for r in results.values())  # int4 rows beside float ones
    lines = ["| model | Rouge-L | Rouge-L unicode | val loss | ppl | retention % | retention % unicode |"
             + (" size MiB |" if sizes else ""), "|---|---|---|---|---|---|---|" + ("---|" if sizes else "")]
    for name, r in results.items():
        cells = [name, _fmt(r.get("rougeL"), r.get("rougeL_std")),
                 _fmt(r.get("rougeL_unicode"), r.get("rougeL_unicode_std")), _fmt(r.get("loss"), digits=4),
                 _fmt(r.get("perplexity")),
                 _fmt(None if r["retention"] is None else 100 * r["retention"], digits=1),
                 _fmt(None if r["retention_unicode"] is None else 100 * r["retention_unicode"], digits=1)]
        if sizes:
            cells.append(_fmt(r["size_bytes"] / 2 ** 20 if "size_bytes" in r else None, digits=1))
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    extra = dict(extra or {})
    if "kd_vs_sft" in extra:
        table += f"\n{extra['kd_vs_sft']['text']}\n"
    if "stages" in extra:
        table += "\n" + stages_table(extra["stages"])
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "report.md"), "w", encoding="utf-8") as f:
            f.write(table)
        with open(os.path.join(out_dir, "report.json"), "w", encoding="utf-8") as f:
            json.dump({"teacher": teacher, "results": results, **extra}, f, indent=2, ensure_ascii=False,
                      default=_json_default)
    return table


def _json_default(x):
    if isinstance(x, (np.integer, np.floating)):
        return x.item()
    if isinstance(x, (jax.Array, np.ndarray)):
        return np.asarray(x).tolist()
    raise TypeError(f"report.json: cannot write a {type(x).__name__}")


# ---------------------------------------------------------------------------------------------
# Training curves
# ---------------------------------------------------------------------------------------------

def read_metrics(path: str) -> list[dict[str, Any]]:
    """The rows of a metrics JSONL file (one JSON object per line, each with an integer "step")."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"malformed JSON ({e.msg} at column {e.colno})", path=path, line=lineno) from None
            if not isinstance(row, dict) or not isinstance(row.get("step"), (int, float)):
                raise DataError("each line must be a JSON object with a numeric 'step'", path=path, line=lineno,
                                field="step")
            rows.append(row)
    return rows


def _is_eval_row(row: Mapping[str, Any]) -> bool:
    return any(k in row for k in ROUGE_KEYS) or row.get("split", "train") != "train"


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def plot_curves(metrics_jsonl: str, out_png: str, *, title: str | None = None) -> str:
    """Loss against step (left) and Rouge-L against step (right) from a training metrics JSONL.

    Every numeric key containing "loss" is a loss curve ("loss", "kd_loss", "ce_loss",
    "valid_loss"...); rows with a Rouge-L key (or a "split" other than "train") are evaluations,
    and their losses are drawn as separate, marked "(eval)" curves. Rouge-L curves: "rougeL" and
    "rougeL_unicode", with a band of +/- their "_std" when logged. Writes `out_png`, returns it.
    """
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_jsonl)
    losses: dict[str, list[tuple[float, float]]] = {}
    rouges: dict[str, list[tuple[float, float, float]]] = {}
    for row in rows:
        evaluation = _is_eval_row(row)
        for key, value in row.items():
            if "loss" in key and _number(value):
                label = f"{key} (eval)" if evaluation and key in ("loss", "kd_loss", "ce_loss") else key
                losses.setdefault(label, []).append((row["step"], value))
            elif key in ROUGE_KEYS and _number(value):
                std = row.get(f"{key}_std")
                rouges.setdefault(key, []).append((row["step"], value, std if _number(std) else 0.0))
    fig, (ax_loss, ax_rouge) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, points in losses.items():
        x, y = zip(*sorted(points))
        marker = "o" if "(eval)" in label or label.startswith(("valid", "val_", "eval")) else None
        ax_loss.plot(x, y, label=label, marker=marker, markersize=4, linewidth=1.5)
    ax_loss.set(xlabel="step", ylabel="loss (nats / token)", title="Loss")
    for key, points in rouges.items():
        x, y, s = map(np.array, zip(*sorted(points)))
        ax_rouge.plot(x, y, marker="o", markersize=4, label={"rougeL": "Rouge-L",
                                                             "rougeL_unicode": "Rouge-L unicode"}[key])
        if s.any():
            ax_rouge.fill_between(x, y - s, y + s, alpha=0.2)
    ax_rouge.set(xlabel="step", ylabel="Rouge-L (x100)", title="Rouge-L on held-out prompts")
    for ax, series, what in ((ax_loss, losses, "loss"), (ax_rouge, rouges, "Rouge-L")):
        ax.grid(True, alpha=0.3)
        if series:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, f"no {what} in {os.path.basename(metrics_jsonl)}", ha="center", va="center",
                    transform=ax.transAxes, color="gray")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
