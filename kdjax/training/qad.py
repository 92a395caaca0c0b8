"""Quantization-aware distillation (QAD): the student learns on the int4 grid it will be served on.

It is KD's step (kdjax.training.distill.kd_loss: the chunked `kd.divergence` to the teacher, mixed
with the data's cross-entropy by `kd.kd_ratio`) with one change inside the loss: before the
student's forward, its decoder linears are fake-quantized (kdjax/quant/fake_quant.py) onto the grid
of an int4 start, RTN or GPTQ (`quant.start`, `quant.bits`, `quant.group_size`, `quant.sym`,
`quant.desc_act`: the grid `kdjax quantize` and the GPTQ export use), with a straight-through
gradient. The loop (kdjax/training/loop.py) runs it like every trainer: resume, progress,
checkpoints, evaluation (of the int4 model).

    the model to quantize: `student`, or `teacher` when student is ""
    the teacher:           quant.teacher = "self" (its own float original) or "teacher" (`teacher`)
    what learns:           quant.train_weights: the latent weights, in grid coordinates (one unit
                           = one grid step, so train.lr is a share of a step per update); their
                           codes are round(u) + zero. quant.train_scales: the scales (as logs:
                           train.lr is a relative change) and asymmetric zero points. Scales alone
                           keep the start's codes: EfficientQAT's end-to-end step after a GPTQ
                           start (arXiv 2407.11062). quant.train_norms: the RMSNorm scales, which
                           scale the inputs of the quantized linears; the other float parameters
                           (embeddings, head, biases) stay the model's.

Step 0 is the start's int4 model exactly (fake_quant.grid_coordinates: the float weights where
they round to the start's codes, the codes themselves elsewhere). Files: out_dir/start (the
start, a GPTQ checkpoint; --resume reads it back, so a resumed run trains on the same grid) and
out_dir/int4 (the result, a GPTQ checkpoint that `kdjax export --format=gptq` re-packs unchanged
and transformers + gptqmodel load).
"""
from __future__ import annotations

import dataclasses
import os
import time
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from kdjax.errors import ConfigError, UserError
from kdjax.quant import fake_quant
from kdjax.quant.calibration import calibration_ids
from kdjax.quant.export_gptq import read_gptq, save_gptq
from kdjax.quant.quantize import (METHODS, QuantizedModel, check_group_size, get_linear, grid_problem, quantize_model,
                                  range_search)
from kdjax.training import distill
from kdjax.training.loop import fit, resolve_steps
from kdjax.training.models import load_frozen, load_trained, shared_vocab
from kdjax.training.rundir import RunDir

START, INT4 = "start", "int4"  # out_dir/start: the int4 start; out_dir/int4: the result (GPTQ checkpoints)
TEACHERS = ("self", "teacher")


def check_config(cfg):
    """The quant.* fields QAD reads (and distill's), named by their flag."""
    q = cfg.quant
    if q.start not in METHODS:
        raise ConfigError("quant.start", f"={q.start!r}: expected one of {', '.join(METHODS)}")
    problem = grid_problem(q.bits, q.group_size, q.mse, q.float_dtype)
    if problem:
        field, why = problem
        raise ConfigError(f"quant.{field}", f"={q[field]!r}: {why}")
    if q.teacher not in TEACHERS:
        raise ConfigError("quant.teacher", f"={q.teacher!r}: expected 'self' (the float model being quantized "
                                           f"teaches) or 'teacher' (the model `teacher` names)")
    if not (q.train_weights or q.train_scales or q.train_norms):
        raise ConfigError("quant.train_weights", "=False with quant.train_scales=False and quant.train_norms=False "
                                                 "leaves nothing to train")
    for name in ("calib_samples", "calib_length"):
        if q[name] < 1:
            raise ConfigError(f"quant.{name}", f"={q[name]}: must be >= 1")
    if cfg.train.weight_decay:
        raise ConfigError("train.weight_decay", f"={cfg.train.weight_decay}: QAD trains grid coordinates and log-scales, "
                                                f"which decay would pull to the zero point and to scale 1; set 0")
    if cfg.train.select_best:
        raise ConfigError("train.select_best", f"={cfg.train.select_best!r}: QAD keeps its last step (its model is "
                                               f"the int4 checkpoint out_dir/{INT4}); set it to ''")
    distill.check_config(cfg)


def source(cfg) -> str:
    """The float model QAD quantizes: `student`, or `teacher` when student is empty."""
    return cfg.student or cfg.teacher


def teacher_source(cfg) -> str:
    return source(cfg) if cfg.quant.teacher == "self" else cfg.teacher


# ---- the int4 start ---------------------------------------------------------------------------
def int4_start(cfg, model, tokenizer, train_records, path: str, *, method: str | None = None,
               log=print) -> QuantizedModel:
    """RTN or GPTQ (`method`, default quant.start) of `model` on the quant.* grid, GPTQ calibrated
    on quant.calib_samples rows of `train_records`; written to `path` as a GPTQ checkpoint. With
    cfg.resume, the checkpoint an earlier run wrote there is read back instead."""
    q, method = cfg.quant, method or cfg.quant.start
    mse = range_search(q.mse, method)
    if cfg.resume and os.path.exists(os.path.join(path, "config.json")):
        qm = read_gptq(path)[1]
        log(f"int4 start: {path} (written by the interrupted run)")
        return qm
    try:
        check_group_size(model, q.group_size, option="--config.quant.group_size")
    except ValueError as e:
        raise UserError(str(e)) from None
    calib = None
    if method == "gptq":
        calib = calibration_ids(train_records, tokenizer, num_rows=q.calib_samples, length=q.calib_length,
                                template=cfg.data.template)
    act = ", act-order" if q.desc_act and method == "gptq" else ""
    log(f"int4 start: {method}, {q.bits} bits, group {q.group_size}, {'sym' if q.sym else 'asym'}{act}"
        + (f", range search (mse {mse:g})" if mse else "")
        + (f", {calib.shape[0]} x {calib.shape[1]} calibration tokens" if calib is not None else ""))
    qm = quantize_model(model, calib, method=method, bits=q.bits, group_size=q.group_size, sym=q.sym,
                        desc_act=q.desc_act, percdamp=q.damp_percent, batch_size=cfg.eval.batch_size, mse=mse)
    save_gptq(model, qm, path, tokenizer=tokenizer, dtype=q.float_dtype)
    log(f"int4 start: {method} took {qm.seconds:.0f} s -> {path}")
    return qm


# ---- what the loop trains, and the loss -------------------------------------------------------
def _variables(tree):
    """A nested dict of arrays as nnx containers of Params (int keys: a list, as the model's layers)."""
    if isinstance(tree, dict):
        if all(isinstance(k, int) for k in tree):
            return nnx.List([_variables(tree[i]) for i in range(len(tree))])
        return nnx.Dict({k: _variables(v) for k, v in tree.items()})
    return nnx.Param(jnp.asarray(tree))


class Trainable(nnx.Module):
    """What QAD trains, as trees keyed like the model's parameters (kdjax/quant/fake_quant.py): `u`,
    the latent weights in grid coordinates (quant.train_weights); `log_scale` / `zero`, the grid
    (quant.train_scales; the zero of asymmetric grids only); `norms`, the RMSNorm scales
    (quant.train_norms). An absent part stays as it was. Every part is of order one in its unit:
    train.lr is a share of a grid step for u, a relative change for the scales and norms."""

    def __init__(self, u=None, log_scale=None, zero=None, norms=None):
        self.u = None if u is None else _variables(u)
        self.log_scale = None if log_scale is None else _variables(log_scale)
        self.zero = None if zero is None else _variables(zero)
        self.norms = None if norms is None else _variables(norms)


def split_norms(params: dict) -> tuple[dict, dict]:
    """(the RMSNorm scales, everything else) of a model's pure-dict parameters, each a tree of the
    same nesting (RMSNorm is the model's only module with a `scale`)."""
    norms, rest = {}, {}
    for k, v in params.items():
        if isinstance(v, dict):
            n, r = split_norms(v)
            if n:
                norms[k] = n
            if r:
                rest[k] = r
        else:
            (norms if k == "scale" else rest)[k] = v
    return norms, rest


def union(a: dict, b: dict) -> dict:
    """The trees a and b (no leaf in both) as one."""
    out = dict(a)
    for k, v in b.items():
        out[k] = union(out[k], v) if k in out else v
    return out


def student_params(parts: dict, bits: int) -> dict:
    """The float model's parameters with fake-quantized decoder kernels, from the QAD parts
    {"latent" (the float parameters but the norms), "norms", "u", "log_scale", "zero", "g_idx"}."""
    scale = fake_quant.map_linears(jnp.exp, parts["log_scale"])
    return fake_quant.quantized_params(union(parts["latent"], parts["norms"]), parts["u"], scale, parts["zero"],
                                       parts["g_idx"], bits=bits)


def qad_loss(params, rows, frozen, totals, *, kd_loss, bits):
    """KD's loss of the fake-quantized student: `params` (what trains) and frozen["grid"] (what
    does not) make the student's parameters; frozen["teacher"] is the teacher's."""
    return kd_loss(student_params({**frozen["grid"], **params}, bits), rows, frozen["teacher"], totals)


@dataclasses.dataclass
class QADTask:
    """A QAD run as the loop runs it (`task`), and how its trained parts become models again."""
    task: object  # the loop's Task
    model: object  # the float model (its parameters are the student's float ones)
    grid: dict  # the frozen parts
    qm: QuantizedModel  # the start

    def parts(self, trainable: Trainable) -> dict:
        return {**self.grid, **nnx.to_pure_dict(nnx.state(trainable))}

    def fake_quantized_model(self, trainable: Trainable):
        """The float model with fake-quantized kernels: forward == the int4 model's, bit for bit."""
        return nnx.merge(nnx.graphdef(self.model), student_params(self.parts(trainable), self.qm.bits))

    def export(self, trainable: Trainable, seconds: float = 0.0, float_dtype: str = "float32"):
        """(the float model with the trained norms, the int4 layers of `trainable`): what the GPTQ
        checkpoint holds, its float parameters rounded to `float_dtype` as the checkpoint stores them."""
        parts, qm = self.parts(trainable), self.qm
        _, rest = split_norms(nnx.to_pure_dict(nnx.state(self.model)))
        params = jax.tree.map(lambda x: x.astype(float_dtype).astype(x.dtype), union(rest, parts["norms"]))
        model = nnx.merge(nnx.graphdef(self.model), params)
        return model, fake_quant.quantized_model(
            parts["u"], fake_quant.map_linears(jnp.exp, parts["log_scale"]), parts["zero"], parts["g_idx"],
            bits=qm.bits, group_size=qm.group_size, sym=qm.sym, desc_act=qm.desc_act, method="qad",
            static_groups=qm.static_groups, percdamp=qm.percdamp, calib_tokens=qm.calib_tokens, mse=qm.mse,
            seconds=qm.seconds + seconds)


def qad_task(cfg, model, teacher, tokenizer, mesh, rows, qm: QuantizedModel, evaluate=None,
             batches=None) -> QADTask:
    """QAD of `model` (float, on `mesh`) from `teacher`, starting from the int4 layers `qm`, as
    the loop runs it: KD's Task (distill.kd_task) with the fake-quantized student inside its loss;
    `batches` replaces the data rows (the teacher's answers)."""
    q = cfg.quant
    kd = distill.kd_task(cfg, model, teacher, tokenizer, mesh, rows, batches=batches)
    trees = fake_quant.grid_trees(qm, {p: get_linear(model, p).kernel[...] for p in qm.linears})
    trees["log_scale"] = fake_quant.map_linears(jnp.log, trees.pop("scale"))
    trees["norms"], latent = split_norms(nnx.to_pure_dict(nnx.state(model)))
    for path, _ in fake_quant.linear_items(trees["g_idx"]):  # their weights come from the grid
        _, i, mod, name = path.split(".")
        del latent["layers"][int(i)][mod][name]["kernel"]
    train_zero = q.train_scales and not qm.sym  # a symmetric grid's zero point is fixed
    trained = {"u": q.train_weights, "log_scale": q.train_scales, "zero": train_zero, "norms": q.train_norms}
    trainable = Trainable(**{k: trees[k] for k, on in trained.items() if on})
    replicated = NamedSharding(mesh, P())
    grid = {"latent": latent, "g_idx": trees["g_idx"], **{k: trees[k] for k, on in trained.items() if not on}}
    grid = jax.tree.map(lambda x: x if isinstance(getattr(x, "sharding", None), NamedSharding)
                        else jax.device_put(x, replicated), grid)
    qt = QADTask(task=None, model=model, grid=grid, qm=qm)
    qt.task = dataclasses.replace(kd, name="qad", model=trainable, loss=partial(qad_loss, kd_loss=kd.loss, bits=qm.bits),
                                  frozen={"teacher": kd.frozen, "grid": grid},
                                  evaluate=None if evaluate is None else (lambda t: evaluate(qt.fake_quantized_model(t))))
    return qt


# ---- the run ----------------------------------------------------------------------------------
def train(cfg, *, overwrite: bool = False) -> dict:
    """QAD as configured. Returns {"student": the int4 model (AQT layers, as out_dir/int4 holds it),
    "qm", "export" (out_dir/int4), "start" (out_dir/start), "source", "teacher", "tokenizer",
    "splits", "rows", "mesh", "best": None, "start_step"}."""
    from kdjax.quant.aqt_pass import to_int4_model
    check_config(cfg)
    src = source(cfg)
    prep = cfg.copy_and_resolve_references()
    prep.teacher = src  # the tokenizer of the model being quantized
    splits, tokenizer, rows, mesh = distill.prepare(prep)
    resolve_steps(cfg, len(rows["train"]["input_ids"]))
    run = RunDir(cfg, overwrite=overwrite)
    try:
        model, _ = load_trained(src, cfg, mesh)
        teacher = load_frozen(teacher_source(cfg), cfg, mesh)[0]
        shared_vocab(model, teacher, tokenizer)
        qm = int4_start(cfg, model, tokenizer, splits["train"], os.path.join(cfg.out_dir, START))
        evaluate = distill.validation(cfg, tokenizer, splits, rows) if cfg.train.eval_every else None
        batches = distill.answer_batches(cfg, splits, rows, tokenizer, teacher)  # kd.teacher_answers
        qt = qad_task(cfg, model, teacher, tokenizer, mesh, rows, qm, evaluate, batches)
        t0 = time.time()
        result = fit(cfg, qt.task, run)
        model, out = qt.export(result["model"], seconds=time.time() - t0, float_dtype=cfg.quant.float_dtype)
        path = os.path.join(cfg.out_dir, INT4)
        if jax.process_index() == 0:
            save_gptq(model, out, path, tokenizer=tokenizer, dtype=cfg.quant.float_dtype)
            print(f"saved {path} (GPTQ checkpoint: {out.bits} bits, group {out.group_size})", flush=True)
    finally:
        run.close()
    return dict(student=to_int4_model(model, out), qm=out, export=path, start=os.path.join(cfg.out_dir, START),
                source=src, teacher=teacher, tokenizer=tokenizer, splits=splits, rows=rows, mesh=mesh, best=None,
                start_step=result["start_step"])
