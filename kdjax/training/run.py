"""A training command from config to report: train (kdjax.training.<method>), save the model in
HF format (int4 models: GPTQ), score it on the held-out split beside the models it must be compared
with, write report.md / report.json / curves.png."""
from __future__ import annotations

import json
import os
import time

import jax

from kdjax import evaluate, report
from kdjax.checkpoint import load, save
from kdjax.errors import ConfigError
from kdjax.quant.export_gptq import load_gptq
from kdjax.quant.report import served_bytes
from kdjax.train_config import override
from kdjax.training import distill, gkd, grpo, minillm, qad, teacher_cache
from kdjax.training.models import parse_layers, student_from_teacher
from kdjax.training.rundir import RunDir
from kdjax.training.state import config_mesh

TRAINERS = {"distill": distill.train, "gkd": gkd.train, "minillm": minillm.train}
CHECKS = {"distill": distill.check_config, "gkd": gkd.check_config, "minillm": minillm.check_config}
AFTER = {"distill": "student after KD", "gkd": "student after GKD", "minillm": "student after MiniLLM"}
BASELINE = "student after SFT (baseline)"
QAD_STAGE = "int4 QAD of the student"


def run(cfg, mode: str, *, overwrite: bool = False) -> str:
    """`kdjax sft|distill|gkd|minillm|grpo`: train as configured, then report; returns out_dir."""
    cfg.mode = mode
    if mode == "grpo":
        return _report_grpo(cfg, grpo.train(cfg, overwrite=overwrite))
    if mode == "qad":
        return run_qad(cfg, overwrite=overwrite)
    if mode == "sft":
        result = distill.train(cfg, overwrite=overwrite)
        _export(result["student"], result["tokenizer"], os.path.join(cfg.out_dir, "sft"))
        rows = [("before SFT", lambda: load(cfg.teacher, dtype=cfg.dtype, mesh=result["mesh"])[0])] \
            if cfg.eval.before else []
        rows.append((_label("after SFT", result["best"]), lambda: result["student"]))
        _evaluate_and_report(cfg, result, rows, teacher=None)
        return cfg.out_dir
    return run_kd(cfg, mode, overwrite=overwrite)


# ---- the paper's recipe: teacher SFT -> KD, beside the same student fine-tuned alone --------------
def run_kd(cfg, mode: str, *, overwrite: bool = False) -> str:
    """[teacher_sft.steps > 0: fine-tune the teacher on the data] -> KD (`mode`) of the student ->
    [baseline: the same student, from the same weights, fine-tuned on the same rows for the same
    steps and lr without a teacher] -> the report of them all, each stage's budget beside it.
    Every stage has its own run directory under out_dir, so `--resume` continues the stage that
    was running and skips the finished ones. With kd.teacher_cache the KD stage reads the teacher
    from that store, which is built there first (of the teacher KD learns from: after its SFT
    stage, when there is one) unless it is complete already. With quant.aware the KD student is
    then quantized with QAD (out_dir/qad); with quant.report the report adds its int4 rows (GPTQ, QAD)."""
    CHECKS[mode](cfg)  # config, then data and tokenizer: every input error before a model is loaded
    if cfg.quant.aware or cfg.quant.report:
        _check_qad_stage(cfg)
    context = _context(cfg)
    if cfg.kd.teacher_cache and not overwrite:  # a store of another run: said before anything trains
        teacher_cache.refuse_other(cfg, context["tokenizer"], context["rows"]["train"],
                                   teacher=not cfg.teacher_sft.steps)
    stages, kcfg = {}, cfg.copy_and_resolve_references()
    tcfg = teacher_sft_config(cfg, os.path.join(cfg.out_dir, "teacher_sft"))
    bcfg = _stage_config(kcfg, os.path.join(cfg.out_dir, "sft_baseline"), mode="sft", student="")
    qcfg = qad_stage_config(kcfg)
    # every stage's run directory is checked first (locked? an earlier run's checkpoints?), so a
    # conflict is reported at once, not after the stages before it have trained
    for scfg, wanted in ((tcfg, cfg.teacher_sft.steps), (kcfg, True), (bcfg, cfg.baseline), (qcfg, cfg.quant.aware)):
        if wanted:
            RunDir(scfg, overwrite=overwrite).close()
    if cfg.teacher_sft.steps:
        stages["teacher SFT"] = _stage(tcfg, distill.train, "sft", overwrite)
        kcfg.teacher = stages["teacher SFT"]["export"]
    if kcfg.kd.teacher_cache:
        stages["teacher cache"] = _cache_stage(kcfg, context, overwrite)
    if not cfg.student:  # the student is the (fine-tuned) teacher's layers: saved once, so the baseline shares it
        kcfg.student = student_init(kcfg)
    stages[AFTER[mode]] = _stage(kcfg, TRAINERS[mode], "student", overwrite)
    if cfg.baseline:
        bcfg.teacher = kcfg.student  # the model `sft` trains: the KD student's starting weights
        stages[BASELINE] = _stage(bcfg, distill.train, "sft", overwrite)
    if cfg.quant.aware:
        qcfg.student = stages[AFTER[mode]]["export"]  # the KD student, quantized; quant.teacher: who teaches it
        stages[QAD_STAGE] = _stage(qcfg, qad.train, qad.INT4, overwrite)
    result = stages[AFTER[mode]]["result"] or context
    rows = []
    if cfg.eval.before:
        rows.append(("teacher", lambda: load(cfg.teacher, dtype=cfg.dtype, mesh=result["mesh"])[0]))
        if cfg.teacher_sft.steps:
            rows.append(("teacher after SFT", lambda: load(kcfg.teacher, dtype=cfg.dtype, mesh=result["mesh"])[0]))
        rows.append(("student before training", lambda: load(kcfg.student, dtype=cfg.dtype, mesh=result["mesh"])[0]))
    if cfg.baseline:
        rows.append((BASELINE, lambda: load(stages[BASELINE]["export"], dtype=cfg.dtype, mesh=result["mesh"])[0]))
    after = _label(AFTER[mode], stages[AFTER[mode]]["best"])
    rows.append((after, lambda: load(stages[AFTER[mode]]["export"], dtype=cfg.dtype, mesh=result["mesh"])[0]))
    if cfg.quant.report:
        gptq = _student_gptq(qcfg, stages[AFTER[mode]]["export"], result, stages.get(QAD_STAGE))
        rows.append((f"{AFTER[mode]}, int4 GPTQ", lambda: load_gptq(gptq, dtype=cfg.dtype)[0]))
        if cfg.quant.aware:
            rows.append((f"{AFTER[mode]}, int4 after QAD",
                         lambda: load_gptq(stages[QAD_STAGE]["export"], dtype=cfg.dtype)[0]))
    teacher = "teacher after SFT" if cfg.teacher_sft.steps else "teacher"
    _evaluate_and_report(cfg, result, rows, teacher=teacher if cfg.eval.before else None, stages=stages,
                         compare=(after, BASELINE) if cfg.baseline else None, sizes=cfg.quant.report)
    if cfg.quant.aware:
        _curves(qcfg.out_dir)
    return cfg.out_dir


def teacher_sft_config(cfg, out_dir: str):
    """The teacher's fine-tuning stage of cfg: `kdjax sft` of cfg.teacher for teacher_sft.steps at
    teacher_sft.lr on the same data, into out_dir."""
    return _stage_config(cfg, out_dir, mode="sft", **{
        "train.steps": cfg.teacher_sft.steps, "train.lr": cfg.teacher_sft.lr, "train.epochs": 0.0,
        "train.eval_every": 0, "train.select_best": "", "student": ""})


def run_teacher_sft(cfg, out_dir: str, overwrite: bool = False) -> str:
    """Fine-tunes cfg.teacher as its teacher_sft section says (or takes a finished one with
    cfg.resume); the HF directory of the fine-tuned teacher."""
    return _stage(teacher_sft_config(cfg, out_dir), distill.train, "sft", overwrite)["export"]


# ---- int4: QAD of a float model, and the int4 rows of a KD report ----------------------------------
def run_qad(cfg, *, overwrite: bool = False) -> str:
    """`kdjax qad`: QAD of a float model (kdjax/training/qad.py), then the int4 report: the float
    model, RTN on the same grid (out_dir/rtn, when the start is GPTQ), its int4 start and the int4
    model after QAD (each read back from its GPTQ checkpoint), each with Rouge-L, validation loss,
    retention against the teacher and size."""
    result = qad.train(cfg, overwrite=overwrite)
    float_label = "float model" + (" (teacher)" if cfg.quant.teacher == "self" else "")
    rows = []
    if cfg.quant.teacher == "teacher" and cfg.eval.before:
        rows.append(("teacher", lambda: load(cfg.teacher, dtype=cfg.dtype, mesh=result["mesh"])[0]))
    rows.append((float_label, lambda: load(result["source"], dtype=cfg.dtype, mesh=result["mesh"])[0]))
    if cfg.quant.start != "rtn":  # RTN takes seconds: the baseline every int4 method must beat
        rtn = os.path.join(cfg.out_dir, "rtn")
        qad.int4_start(cfg, load(result["source"], dtype="float32")[0], result["tokenizer"], result["splits"]["train"],
                       rtn, method="rtn")
        rows.append(("int4 rtn", lambda: load_gptq(rtn, dtype=cfg.dtype)[0]))
    rows += [(f"int4 {cfg.quant.start} (the start)", lambda: load_gptq(result["start"], dtype=cfg.dtype)[0]),
             ("int4 after QAD", lambda: load_gptq(result["export"], dtype=cfg.dtype)[0])]
    teacher = float_label if cfg.quant.teacher == "self" else ("teacher" if cfg.eval.before else None)
    _evaluate_and_report(cfg, result, rows, teacher=teacher, sizes=True)
    return cfg.out_dir


def _check_qad_stage(cfg):
    if cfg.quant.aware and cfg.quant.steps < 1:
        raise ConfigError("quant.steps", f"={cfg.quant.steps}: the QAD stage (quant.aware) needs >= 1 step")
    if cfg.quant.aware and not cfg.quant.lr > 0:
        raise ConfigError("quant.lr", f"={cfg.quant.lr}: must be > 0")
    qad.check_config(qad_stage_config(cfg))


def qad_stage_config(cfg):
    """The QAD stage of a KD run (quant.aware), in out_dir/qad: its own steps and lr, the last step kept,
    on the divergence alone (kd.hidden_weight, a KD student's layer-state term, was measured for KD only)."""
    return _stage_config(cfg, os.path.join(cfg.out_dir, "qad"), mode="qad", **{
        "train.steps": cfg.quant.steps, "train.lr": cfg.quant.lr, "train.epochs": 0.0, "train.weight_decay": 0.0,
        "train.select_best": "", "train.eval_every": 0, "kd.hidden_weight": 0.0})


def _student_gptq(qcfg, student: str, result, qad_stage) -> str:
    """The GPTQ checkpoint of the KD student: the QAD stage's start when that was GPTQ on this grid,
    else quantized now into out_dir/qad/gptq (read back when --resume finds it)."""
    if qad_stage is not None and qcfg.quant.start == "gptq":
        return os.path.join(qcfg.out_dir, qad.START)
    path = os.path.join(qcfg.out_dir, "gptq")
    model = load(student, dtype="float32")[0]
    qad.int4_start(qcfg, model, result["tokenizer"], result["splits"]["train"], path, method="gptq")
    return path


def _context(cfg) -> dict:
    """What the report (of a run whose training finished earlier: --resume) and the teacher cache
    need: distill.prepare's splits, tokenizer, rows and mesh."""
    splits, tokenizer, rows, mesh = distill.prepare(cfg)
    return dict(splits=splits, tokenizer=tokenizer, rows=rows, mesh=mesh)


def _cache_stage(cfg, context, overwrite: bool = False) -> dict:
    """The teacher cache of cfg's KD stage at kd.teacher_cache (built, finished or found complete),
    as a stage of the report: where, build time, rows, K, bytes a response token. context: _context's
    (or distill.prepare's splits, tokenizer, rows and mesh under those names)."""
    prepared = (context["splits"], context["tokenizer"], context["rows"], context["mesh"])
    attrs = teacher_cache.build(cfg.copy_and_resolve_references(), cfg.kd.teacher_cache, overwrite=overwrite,
                                prepared=prepared)
    return dict(export=cfg.kd.teacher_cache, seconds=attrs["seconds"], steps=0, rows=attrs["cached_rows"],
                top_k=attrs["top_k"], samples=attrs["samples"], bytes_per_token=round(attrs["bytes_per_token"], 1))


def _stage_config(cfg, out_dir: str, **fields):
    """cfg for a stage that runs in out_dir, with `fields` ("train.lr": ...) changed."""
    c = cfg.copy_and_resolve_references()
    c.out_dir = out_dir
    return override(c, fields)


def _stage(cfg, train_fn, export: str, overwrite: bool) -> dict:
    """Runs one stage (or, with cfg.resume, takes the finished one as it is) and exports its model
    to out_dir/`export` (HF); {"export", "seconds", "steps", "rows", "result" (None when skipped)}."""
    done = os.path.join(cfg.out_dir, "done.json")
    if cfg.resume and not overwrite and os.path.exists(done):
        with open(done) as f:
            info = json.load(f)
        print(f"{cfg.out_dir}: finished earlier ({info['steps']} steps), not run again", flush=True)
        info["result"] = None
        return info
    t0 = time.time()
    result = train_fn(cfg, overwrite=overwrite)
    path = result.get("export") or os.path.join(cfg.out_dir, export)  # QAD writes its GPTQ checkpoint itself
    if "export" not in result:
        _export(result["student"], result["tokenizer"], path)
    info = dict(export=path, seconds=round(time.time() - t0, 1), steps=cfg.train.steps,
                rows=cfg.train.steps * cfg.train.batch_size, best=result["best"])
    if _writer():
        with open(done, "w") as f:
            json.dump(info, f, indent=2)
    info["result"] = result
    return info


def student_init(cfg, path: str = "") -> str:
    """path (default out_dir/student_init): the student made of the teacher's `student_layers`, in
    kdjax format (with cfg.resume, the one the interrupted run started from)."""
    from kdjax.checkpoint import load_tokenizer
    path = path or os.path.join(cfg.out_dir, "student_init")
    if cfg.resume and os.path.exists(os.path.join(path, "kdjax_config.json")):
        return path
    # placed on the run's mesh: on several processes each then holds its part of one global array,
    # which is what saving it takes (an array on one device is out of reach of the others)
    mesh = config_mesh(cfg, cfg.train.batch_size // cfg.train.grad_accum, "train.batch_size / train.grad_accum")
    teacher, tokenizer = load(cfg.teacher, dtype=cfg.dtype, param_dtype=cfg.teacher_param_dtype or cfg.dtype,
                              mesh=mesh)
    student = student_from_teacher(teacher, parse_layers(cfg.student_layers, teacher.config.num_layers),
                                   param_dtype=cfg.param_dtype)
    save(student, path, format="kdjax", tokenizer=tokenizer or load_tokenizer(cfg.teacher))
    return path


def _export(model, tokenizer, path):
    save(model, path, format="hf", tokenizer=tokenizer)
    print(f"saved {path} (HF safetensors)", flush=True)


def _label(name, best) -> str:
    return f"{name} (step {best['step']}: best validation {best['metric']})" if best else name


def _writer() -> bool:
    return jax.process_index() == 0


def _evaluate_and_report(cfg, result, rows, *, teacher, stages=None, compare=None, sizes=False):
    """Scores each (label, model getter) on the test prompts; report.md / report.json / curves.
    sizes: a size column (each model as served: float at 16 bits, int4 packed)."""
    ec, tokenizer = cfg.eval, result["tokenizer"]
    records = distill.eval_records(result["splits"]["test"], tokenizer, cfg, ec.num_samples)
    if records:
        kw = dict(max_length=cfg.data.max_length, template=cfg.data.template, batch_size=ec.batch_size,
                  seeds=[int(s) for s in str(ec.seeds).split(",")], temperature=ec.temperature,
                  top_p=ec.top_p, max_new_tokens=ec.max_new_tokens, log=lambda m: print(m, flush=True))
        results = {}
        for label, get in rows:
            t0 = time.time()
            model = get()
            results[label] = evaluate.evaluate(model, tokenizer, records, **kw)
            if sizes:
                results[label]["size_bytes"] = served_bytes(model)
            print(f"evaluated {label}: Rouge-L {results[label]['rougeL']:.2f} ({time.time() - t0:.0f}s)", flush=True)
        extra = {}
        if stages:
            extra["stages"] = {k: {f: v for f, v in s.items() if f != "result"} for k, s in stages.items()}
        if compare:
            extra["kd_vs_sft"] = report.comparison(results[compare[0]], results[compare[1]])
        table = report.table(results, teacher=teacher, out_dir=cfg.out_dir if _writer() else None, extra=extra)
        print("\n" + table, flush=True)
    _curves(cfg.out_dir)


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
