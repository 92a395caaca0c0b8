"""A study: the same KD run over a grid of config values and seeds, as one table and one plot.

    kdjax study --grid="teacher_sft.steps=0,60 kd.divergence=forward_kl,reverse_kl kd.kd_ratio=0,0.5,1"
                --seeds=0,1,2 --config.out_dir=runs/study

Every cell of the grid is trained once per seed (`train.seed`: the data order) for the same student
steps, then scored on the test prompts (Rouge-L, its Unicode variant, the test rows' loss). Cells
that differ only in fields their run does not use are one run: at kd_ratio 0 (the data's
cross-entropy alone) the divergence and its parameters do not matter. Teachers are fine-tuned once
per distinct teacher_sft setting and shared by every cell that uses them. With kd.teacher_cache
the teacher runs once: its cache (kdjax/training/teacher_cache.py) of every training row
(cache.rows = "all", so every seed's data order finds its rows) is built at that path before the
first run that needs it and every run reads it with no teacher in memory; cells that need another
store (another teacher, temperature or data) get their own, at PATH-1, PATH-2, ... The student made
of a teacher's layers is saved once per teacher (out_dir/student-HASH) and every run starts from it.
Each run keeps its own directory under out_dir (a finished one is not run again with --resume);
its checkpoints, which only a killed run needs, are removed once it is scored (about 2 GB a run
of the default job; keep_checkpoints=True keeps them, and with them the trained students). study.md /
study.json / study.png hold the mean and spread over seeds of every cell, and each cache's build time.

    kdjax study --config=configs/default_lr_sweep.py --grid="train.lr=5e-4,1e-4,5e-5" --seeds=0
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import time

import jax
import numpy as np

from kdjax import evaluate
from kdjax.errors import UserError
from kdjax.train_config import override
from kdjax.training import distill, teacher_cache
from kdjax.training.run import run_teacher_sft, student_init

METRICS = ("rougeL", "rougeL_unicode", "loss")
UNUSED_AT_KD_RATIO_0 = {"kd.divergence": "forward_kl", "kd.temperature": 1.0, "kd.beta": 0.5, "kd.alpha": 0.1,
                        "kd.teacher_answers": False, "kd.answer_tokens": 64,
                        "kd.answer_share": 1.0}  # the baseline learns the data


def parse_grid(spec: str, cfg) -> dict[str, list]:
    """"a.b=1,2 c=x,y" -> {"a.b": [1, 2], "c": ["x", "y"]}, each value of the field's type."""
    grid = {}
    for item in spec.split():
        field, eq, values = item.partition("=")
        if not eq or not values:
            raise UserError(f"--grid: {item!r} is not FIELD=V1,V2,...")
        current = _get(cfg, field)
        kind = type(current)
        try:
            grid[field] = [kind(v) if kind is not bool else v.lower() in ("1", "true", "yes") for v in values.split(",")]
        except ValueError:
            raise UserError(f"--grid: {field}={values}: the field is a {kind.__name__}") from None
    return grid


def _get(cfg, field: str):
    node = cfg
    for part in field.split("."):
        if part not in node:
            raise UserError(f"--grid: the config has no field {field!r}")
        node = node[part]
    return node


def cells(grid: dict[str, list]) -> list[dict]:
    """Every combination of the grid's values, those that run the same training merged."""
    out, seen = [], set()
    for values in itertools.product(*grid.values()):
        cell = dict(zip(grid, values))
        key = json.dumps(effective(cell), sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(cell)
    return out


def effective(cell: dict) -> dict:
    """The cell's values that change its run (kd fields are unused at kd_ratio 0)."""
    if cell.get("kd.kd_ratio", None) == 0:
        return {k: v for k, v in cell.items() if k not in UNUSED_AT_KD_RATIO_0}
    return dict(cell)


def label(cell: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in effective(cell).items())


def run_study(cfg, grid: dict[str, list], seeds: list[int], *, overwrite: bool = False,
              keep_checkpoints: bool = False) -> dict:
    """Trains and scores every (cell, seed); writes out_dir/study.{json,md,png}; returns the summary."""
    distill.check_config(cfg)
    context = distill.prepare(cfg)
    splits, tokenizer = context[0], context[1]
    records = distill.eval_records(splits["test"], tokenizer, cfg, cfg.eval.num_samples)
    if not records:
        raise UserError("--config.eval.num_samples: a study scores the test prompts; it must be > 0")
    teachers, students, caches = {}, {}, {}
    runs = []
    for cell in cells(grid):
        for seed in seeds:
            c = override(cfg.copy_and_resolve_references(), {**cell, "train.seed": seed, "baseline": False,
                                                               "mode": "distill"})
            tag = hashlib.sha1(json.dumps([effective(cell), seed], sort_keys=True).encode()).hexdigest()[:8]
            c.out_dir = os.path.join(cfg.out_dir, f"run-{tag}")
            if c.teacher_sft.steps:  # a fine-tuned teacher, once per setting
                key = (c.teacher, c.teacher_sft.steps, c.teacher_sft.lr)
                if key not in teachers:
                    teachers[key] = run_teacher_sft(c, os.path.join(cfg.out_dir, f"teacher-{len(teachers)}"), overwrite)
                c.teacher = teachers[key]
            if c.kd.teacher_cache and c.kd.kd_ratio:  # at kd_ratio 0 no teacher is needed, cached or live
                c.kd.teacher_cache = _cache_for(c, cfg, context, caches, overwrite)
            out = _scored(c, overwrite)
            if out is None:  # it trains: from the student made of its teacher's layers, once per teacher
                if not c.student:
                    c.student = _student_for(c, cfg, students)
                out = _one_run(c, records, tokenizer, overwrite, keep_checkpoints)
            runs.append(dict(cell=effective(cell), seed=seed, **out))
            print(f"study: {label(cell)}, seed {seed}: Rouge-L {runs[-1]['rougeL']:.2f} "
                  f"(loss {runs[-1]['loss']:.4f}, {runs[-1]['seconds']:.0f} s)", flush=True)
    summary = summarize(runs)
    write(cfg.out_dir, runs, summary, grid, seeds, caches)
    return summary


def _cache_for(c, cfg, context, caches: dict, overwrite: bool) -> str:
    """The teacher cache that run config `c` reads: built (or found complete) the first time a run
    needs one of its teacher, temperature, data and cache.* fields, at cfg.kd.teacher_cache for the
    first, PATH-1, PATH-2, ... for the others; caches: {key: {"path", "seconds", ...}} so far."""
    c.cache.rows = "all"
    key = json.dumps([c.teacher, c.data.to_dict(), c.kd.temperature, c.cache.to_dict()], sort_keys=True, default=str)
    if key not in caches:
        path = cfg.kd.teacher_cache + (f"-{len(caches)}" if caches else "")
        same_data = c.data.to_dict() == cfg.data.to_dict()
        attrs = teacher_cache.build(c, path, overwrite=overwrite, prepared=context if same_data else None)
        caches[key] = dict(path=path, teacher=c.teacher, seconds=attrs["seconds"], rows=attrs["cached_rows"],
                           top_k=attrs["top_k"], samples=attrs["samples"],
                           bytes_per_token=round(attrs["bytes_per_token"], 1))
    return caches[key]["path"]


def _student_for(c, cfg, students: dict) -> str:
    """The student made of run config `c`'s teacher layers, saved once per teacher and dtypes at
    out_dir/student-HASH (named by what it is made of, so that --resume finds the same one)."""
    key = json.dumps([c.teacher, c.student_layers, c.param_dtype, c.dtype, c.teacher_param_dtype])
    if key not in students:
        students[key] = student_init(c, os.path.join(cfg.out_dir, "student-" + hashlib.sha1(key.encode()).hexdigest()[:8]))
    return students[key]


def _scored(c, overwrite: bool) -> dict | None:
    """The scores of run `c` when it finished before and --resume keeps it; None when it is to train."""
    done = os.path.join(c.out_dir, "study_run.json")
    if overwrite or not os.path.exists(done):
        return None
    if not c.resume:  # its checkpoints are gone, so the run directory's own guard would not stop it
        raise UserError(f"{c.out_dir} holds a scored run of an earlier study: keep it with --resume, or "
                        f"train it again with --overwrite")
    with open(done) as f:
        return json.load(f)


def _one_run(c, records, tokenizer, overwrite: bool, keep_checkpoints: bool) -> dict:
    done = os.path.join(c.out_dir, "study_run.json")
    t0 = time.time()
    if c.kd.kd_ratio == 0:  # the data's cross-entropy alone: the SFT baseline, no teacher to run
        c = override(c, {"mode": "sft", "teacher": c.student, "kd.teacher_cache": ""})
    result = distill.train(c, overwrite=overwrite)
    ec = c.eval
    scores = evaluate.evaluate(result["student"], tokenizer, records, max_length=c.data.max_length,
                               template=c.data.template, batch_size=ec.batch_size,
                               seeds=[int(s) for s in str(ec.seeds).split(",")], temperature=ec.temperature,
                               top_p=ec.top_p, max_new_tokens=ec.max_new_tokens)
    out = {k: float(scores[k]) for k in METRICS}
    out.update(seconds=round(time.time() - t0, 1), steps=c.train.steps, out_dir=c.out_dir)
    with open(done, "w") as f:
        json.dump(out, f)
    if not keep_checkpoints and jax.process_index() == 0:  # scored: never resumed, so no checkpoint is needed
        shutil.rmtree(os.path.join(c.out_dir, "checkpoints"), ignore_errors=True)
    return out


def summarize(runs: list[dict]) -> list[dict]:
    """Per cell: mean and population std over its seeds of each metric, and the mean wall time."""
    by_cell = {}
    for r in runs:
        by_cell.setdefault(json.dumps(r["cell"], sort_keys=True), []).append(r)
    out = []
    for rs in by_cell.values():
        row = {"cell": rs[0]["cell"], "seeds": [r["seed"] for r in rs], "seconds": float(np.mean([r["seconds"] for r in rs]))}
        for m in METRICS:
            values = np.array([r[m] for r in rs], np.float64)
            row[m], row[m + "_std"] = float(values.mean()), float(values.std())
        out.append(row)
    return out


def table(summary: list[dict]) -> str:
    lines = ["| run | Rouge-L | Rouge-L unicode | test loss | seeds | time a run |", "|---|---|---|---|---|---|"]
    for r in summary:
        name = ", ".join(f"{k}={v}" for k, v in r["cell"].items()) or "(config as given)"
        lines.append(f"| {name} | {r['rougeL']:.2f} ± {r['rougeL_std']:.2f} | {r['rougeL_unicode']:.2f} ± "
                     f"{r['rougeL_unicode_std']:.2f} | {r['loss']:.4f} ± {r['loss_std']:.4f} | {len(r['seeds'])} | "
                     f"{r['seconds']:.0f} s |")
    return "\n".join(lines) + "\n"


def write(out_dir: str, runs, summary, grid, seeds, caches=None):
    os.makedirs(out_dir, exist_ok=True)
    caches = list((caches or {}).values())
    with open(os.path.join(out_dir, "study.json"), "w") as f:
        json.dump({"grid": grid, "seeds": seeds, "runs": runs, "summary": summary, "caches": caches}, f, indent=2)
    text = table(summary)
    for c in caches:
        text += (f"\nteacher cache {c['path']} (teacher {c['teacher']}): {c['rows']} rows, K = {c['top_k']}"
                 + (f" + {c['samples']} drawn" if c["samples"] else "")
                 + f", {c['bytes_per_token']:.0f} bytes a response token, built in {c['seconds']:.0f} s; the runs "
                   f"read it with no teacher in memory.\n")
    with open(os.path.join(out_dir, "study.md"), "w") as f:
        f.write(text)
    plot(summary, os.path.join(out_dir, "study.png"))
    print("\n" + text, flush=True)


def plot(summary: list[dict], path: str):
    """Rouge-L (left) and test loss (right) of every cell, mean with a bar of +/- one std, one row a
    cell (the first on top); the cells at kd_ratio 0, the SFT baselines, in grey."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    names = [", ".join(f"{k}={v}" for k, v in r["cell"].items()) or "(config as given)" for r in summary]
    colors = ["#999999" if r["cell"].get("kd.kd_ratio") == 0 else "#4C72B0" for r in summary]
    y = np.arange(len(names))[::-1]
    fig, axes = plt.subplots(1, 2, figsize=(13, 1.4 + 0.32 * len(names)), sharey=True)
    for ax, metric, title in ((axes[0], "rougeL", "Rouge-L (test prompts)"), (axes[1], "loss", "test loss (nats)")):
        mean, std = np.array([r[metric] for r in summary]), np.array([r[metric + "_std"] for r in summary])
        ax.barh(y, mean, xerr=std, capsize=3, color=colors)
        if metric == "loss":  # the differences are hundredths of a nat: the axis starts near them, not at 0
            lo, hi = float((mean - std).min()), float((mean + std).max())
            ax.set_xlim(lo - 0.1 * (hi - lo + 1e-3), hi + 0.1 * (hi - lo + 1e-3))
        ax.set_title(title)
        ax.grid(True, axis="x", alpha=0.3)
    axes[0].set_yticks(y, names, fontsize=8)
    fig.suptitle("mean and std over seeds; grey: kd_ratio 0 (the SFT baseline)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
