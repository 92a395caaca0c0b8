"""A training command from config to report: train (kdjax.training.<method>), save the model in
HF format, score it on the held-out split beside the models it must be compared with, write
report.md / report.json / curves.png."""
from __future__ import annotations

import json
import os
import time

import jax

from kdjax import evaluate, report
from kdjax.checkpoint import load, save
from kdjax.training import distill, gkd, grpo, minillm
from kdjax.training.models import parse_layers, student_from_teacher

TRAINERS = {"sft": distill.train, "distill": distill.train, "gkd": gkd.train, "minillm": minillm.train}


def run(cfg, mode: str, *, overwrite: bool = False) -> str:
    """`kdjax sft|distill|gkd|minillm|grpo`: train as configured, then report; returns out_dir."""
    cfg.mode = mode
    if mode == "grpo":
        return _report_grpo(cfg, grpo.train(cfg, overwrite=overwrite))
    return _report_kd(cfg, TRAINERS[mode](cfg, overwrite=overwrite))


def _writer() -> bool:
    return jax.process_index() == 0


def _report_kd(cfg, result) -> str:
    model, teacher, tokenizer = result["student"], result["teacher"], result["tokenizer"]
    kd = cfg.mode != "sft"
    after = ("student after KD" if cfg.mode == "distill" else f"student after {cfg.mode.upper()}") if kd \
        else "after SFT"
    if result["best"]:
        b = result["best"]
        after += f" (step {b['step']}: best validation {b['metric']})"
    out = os.path.join(cfg.out_dir, "student" if kd else "sft")
    save(model, out, format="hf", tokenizer=tokenizer)
    print(f"saved {out} (HF safetensors)", flush=True)
    ec = cfg.eval
    records = distill.eval_records(result["splits"]["test"], tokenizer, cfg, ec.num_samples)
    if records:
        kw = dict(max_length=cfg.data.max_length, template=cfg.data.template, batch_size=ec.batch_size,
                  seeds=[int(s) for s in str(ec.seeds).split(",")], temperature=ec.temperature,
                  top_p=ec.top_p, max_new_tokens=ec.max_new_tokens, log=lambda m: print(m, flush=True))
        todo = []
        if ec.before:
            if kd:
                todo.append(("teacher", lambda: teacher))
                todo.append(("student before KD", lambda: load(cfg.student, dtype=cfg.dtype, mesh=result["mesh"])[0]
                             if cfg.student else student_from_teacher(
                                 teacher, parse_layers(cfg.student_layers, teacher.config.num_layers))))
            else:
                todo.append(("before SFT", lambda: load(cfg.teacher, dtype=cfg.dtype, mesh=result["mesh"])[0]))
        todo.append((after, lambda: model))
        results = {}
        for label, get in todo:
            t0 = time.time()
            results[label] = evaluate.evaluate(get(), tokenizer, records, **kw)
            print(f"evaluated {label}: Rouge-L {results[label]['rougeL']:.2f} ({time.time() - t0:.0f}s)", flush=True)
        table = report.table(results, teacher="teacher" if "teacher" in results else None,
                             out_dir=cfg.out_dir if _writer() else None)
        print("\n" + table, flush=True)
    _curves(cfg.out_dir)
    return cfg.out_dir


def _report_grpo(cfg, result) -> str:
    policy, tokenizer = result["policy"], result["tokenizer"]
    out = os.path.join(cfg.out_dir, "policy")
    save(policy, out, format="hf", tokenizer=tokenizer)
    print(f"saved {out} (HF safetensors)", flush=True)
    test = result["problems"]["test"][:cfg.eval.num_samples]
    if test:
        results = {}
        if cfg.eval.before:
            results["before GRPO"] = grpo.evaluate_policy(load(result["source"], dtype=cfg.dtype,
                                                               mesh=result["mesh"])[0], tokenizer, test, cfg)
        results["after GRPO"] = grpo.evaluate_policy(policy, tokenizer, test, cfg)
        cols = ("pass_at_1", "tests", "format", "steps", "length")
        lines = ["| model | pass@1 % | tests passed % | format % | steps | tokens |", "|---|---|---|---|---|---|"]
        for name, r in results.items():
            lines.append(f"| {name} | {100 * r['pass_at_1']:.1f} | {100 * r['tests']:.1f} | {100 * r['format']:.1f} "
                         f"| {r['steps']:.2f} | {r['length']:.0f} |")
        table = "\n".join(lines) + (f"\n\n(greedy, {len(test)} held-out problems, up to {cfg.grpo.max_new_tokens} "
                                    f"tokens)\n")
        if _writer():
            with open(os.path.join(cfg.out_dir, "report.md"), "w") as f:
                f.write(table)
            with open(os.path.join(cfg.out_dir, "report.json"), "w") as f:
                json.dump({k: {c: v[c] for c in (*cols, "samples")} for k, v in results.items()}, f, indent=2)
        print("\n" + table, flush=True)
    _curves(cfg.out_dir)
    return cfg.out_dir


def _curves(out_dir):
    metrics = os.path.join(out_dir, "metrics.jsonl")
    if _writer() and os.path.exists(metrics):
        print(f"curves: {report.plot_curves(metrics, os.path.join(out_dir, 'curves.png'))}", flush=True)
