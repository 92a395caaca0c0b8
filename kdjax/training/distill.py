"""Token-level knowledge distillation and supervised fine-tuning on data rows.

Loss (kdjax.losses.chunked_distill_loss): kd_ratio * divergence(student || teacher at the
temperature) + (1 - kd_ratio) * cross-entropy on the data, per response token of the global batch;
SFT is the cross-entropy alone. Batches: `batch_at(rows, step)` of the tokenized data (one sequence
a row, or packed rows with `data.packing`). With `kd.teacher_cache` the teacher is not loaded: each
batch carries the teacher's cached sparse distribution of its rows (kdjax.training.teacher_cache)
and the divergence runs on its support plus a tail bucket (losses.chunked_sparse_distill_loss).
With `kd.teacher_answers` (sequence-level KD) each row's response is the teacher's greedy answer to
its prompt, generated once a run (AnswerBatches).
"""
from __future__ import annotations

import json
import os
import time
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from kdjax import data as kdata
from kdjax import losses
from kdjax.errors import ConfigError
from kdjax.training.loop import Batch, Task, check_train_config, fit, resolve_steps
from kdjax.training.rollout import bucket_width, completion_rows, sample
from kdjax.training.models import (hidden_and_head, load_frozen, load_student, load_trained, parse_layers,
                                   shared_vocab)
from kdjax.sharding import data_shards, process_rows
from kdjax.training import teacher_cache
from kdjax.training.rundir import RunDir
from kdjax.training.state import config_mesh

EVAL_METRICS = ("val_loss", "rougeL", "rougeL_unicode")
ANSWERS = "teacher_answers.json"  # out_dir/: the teacher's answers a run with kd.teacher_answers learns on


# ---- config and data, checked before any model is loaded --------------------------------------
def check_config(cfg):
    """Every choice of the data and KD sections (and train.*), named by its flag."""
    d, kd = cfg.data, cfg.kd
    if d.template not in kdata.TEMPLATES:
        raise ConfigError("data.template", f"={d.template!r}: expected one of {', '.join(kdata.TEMPLATES)}")
    if d.source and d.layout not in kdata.LAYOUTS:
        raise ConfigError("data.layout", f"={d.layout!r}: expected one of {', '.join(sorted(kdata.LAYOUTS))}")
    if d.max_length < 2:
        raise ConfigError("data.max_length", f"={d.max_length}: must be >= 2")
    if kd.divergence not in losses.DIVERGENCES:
        raise ConfigError("kd.divergence", f"={kd.divergence!r}: expected one of {', '.join(losses.DIVERGENCES)}")
    if not 0 <= kd.kd_ratio <= 1:
        raise ConfigError("kd.kd_ratio", f"={kd.kd_ratio}: must be in [0, 1] (loss = kd_ratio * divergence + "
                                         f"(1 - kd_ratio) * cross-entropy)")
    if not kd.temperature > 0:
        raise ConfigError("kd.temperature", f"={kd.temperature}: must be > 0")
    for name in ("beta", "alpha"):
        if not 0 <= kd[name] <= 1:
            raise ConfigError(f"kd.{name}", f"={kd[name]}: must be in [0, 1]")
    if kd.hidden_weight < 0:
        raise ConfigError("kd.hidden_weight", f"={kd.hidden_weight}: must be >= 0")
    if kd.hidden_weight and kd.teacher_cache:
        raise ConfigError("kd.hidden_weight", f"={kd.hidden_weight} with kd.teacher_cache: the cache holds the "
                                              f"teacher's outputs, not its layers' states; set it to 0 or drop the cache")
    if kd.chunk_size < 1:
        raise ConfigError("kd.chunk_size", f"={kd.chunk_size}: must be >= 1")
    if kd.teacher_cache and cfg.mode not in ("distill", "sft"):
        raise ConfigError("kd.teacher_cache", f"={kd.teacher_cache!r}: `kdjax {cfg.mode}` scores the student's own "
                                              f"samples, which no cache holds; the cache is for kdjax distill")
    if kd.teacher_answers:
        if cfg.mode not in ("distill", "sft", "qad"):
            raise ConfigError("kd.teacher_answers", f"=True: `kdjax {cfg.mode}` brings its own responses; the "
                                                    f"teacher's answers are for kdjax distill and qad")
        if kd.teacher_cache:
            raise ConfigError("kd.teacher_answers", "=True with kd.teacher_cache: the cache holds the teacher on the "
                                                    "data's responses, not on its own answers; drop one")
        if d.packing:
            raise ConfigError("kd.teacher_answers", "=True with data.packing: one answer a row; set "
                                                    "--config.data.packing=False")
        if kd.answer_tokens < 1:
            raise ConfigError("kd.answer_tokens", f"={kd.answer_tokens}: must be >= 1")
        if not 0 < kd.answer_share <= 1 or answer_count(cfg) == 0:
            raise ConfigError("kd.answer_share", f"={kd.answer_share}: must be in (0, 1] and leave at least one of "
                                                 f"train.batch_size={cfg.train.batch_size} rows on an answer")
    if d.repack and (d.packing or kd.teacher_cache or cfg.mode not in ("distill", "sft", "qad")):
        why = ("data.packing packs the rows already" if d.packing else "the cache's teacher is laid out by row"
               if kd.teacher_cache else f"`kdjax {cfg.mode}` makes its own rows")
        raise ConfigError("data.repack", f"=True: {why}; set --config.data.repack=False")
    teacher_cache.check_config(cfg)
    check_train_config(cfg, EVAL_METRICS, has_validation=bool(d.valid))


def load_splits(dcfg) -> dict[str, list[kdata.Record]]:
    """The train / valid / test records of the data section (no tokenizer needed)."""
    if dcfg.source:
        records = kdata.load_records(dcfg.source, dcfg.layout, limit=dcfg.limit or None)
    else:
        records = kdata.python_function_records(limit=dcfg.stdlib_pairs or None)
    if dcfg.limit:
        records = records[:dcfg.limit]
    if not records:
        raise kdata.DataError("no records (an empty file?)", path=dcfg.source or "the standard library")
    return kdata.split_records(records, seed=dcfg.seed, valid=dcfg.valid, test=dcfg.test)


def make_rows(dcfg, splits, tokenizer, *, packing: bool | None = None) -> dict[str, dict]:
    """Training and validation rows of the splits ([N, data.max_length], response-only masks)."""
    packing = dcfg.packing if packing is None else packing
    rows = {k: kdata.make_rows(v, tokenizer, max_length=dcfg.max_length, template=dcfg.template,
                               on_long_prompt="skip", packing=packing and k == "train")
            for k, v in splits.items() if k != "test" and v}
    if len(rows.get("train", {}).get("input_ids", ())) == 0:
        raise ConfigError("data.max_length", f"={dcfg.max_length}: no training prompt fits; raise it")
    return rows


def eval_records(records, tokenizer, cfg, n: int):
    """The first `n` records whose prompt fits in data.max_length tokens (as in training)."""
    out = []
    for r in records:
        if len(out) >= n:
            break
        if len(kdata.prompt_ids([r], tokenizer, template=cfg.data.template)[0]) < cfg.data.max_length:
            out.append(r)
    return out


def answer_count(cfg) -> int:
    """Rows of each step that learn on the teacher's answer (kd.answer_share of train.batch_size)."""
    return round(cfg.kd.answer_share * cfg.train.batch_size)


# ---- the step: a loss and a batch source ------------------------------------------------------
class RowBatches:
    """The batch of global step s: `kdata.batch_at(rows, s)`, a pure function of the step."""

    def __init__(self, rows, batch_size: int, seed: int):
        self.data, self.batch_size, self.seed = {k: rows[k] for k in kdata.ROW_KEYS}, batch_size, seed
        self.examples = len(rows["input_ids"])
        self.rows = batch_size
        kdata.steps_per_epoch(self.data, batch_size)  # a clear error when one batch cannot be filled

    def __call__(self, step, model=None) -> Batch:
        rows = kdata.batch_at(self.data, step, batch_size=self.batch_size, seed=self.seed)
        return Batch(rows, tokens=rows["input_ids"].size)


class CachedBatches(RowBatches):
    """The rows of step s (as RowBatches) with the cached teacher of each, rows["teacher"] =
    {"ids", "logp", "log_tail"[, "tail_coef"]}; a process reads only the rows its devices hold."""

    def __init__(self, rows, batch_size: int, seed: int, cache: teacher_cache.TeacherCache, mesh):
        super().__init__(rows, batch_size, seed)
        self.cache, self.mine = cache, process_rows(mesh, batch_size)

    def __call__(self, step, model=None) -> Batch:
        idx = kdata.batch_indices(self.examples, step, batch_size=self.batch_size, seed=self.seed)
        rows = {k: v[idx] for k, v in self.data.items()}
        rows["teacher"] = self.cache.read(idx, self.mine)
        return Batch(rows, tokens=rows["input_ids"].size)


class Repacked:
    """A batch source whose step's sequences are laid end to end in as few rows as hold them
    (data.repack, `kdata.repack`): the same tokens and loss, less padding; the row count varies
    by step (a multiple of `multiple`, the data-parallel devices x train.grad_accum)."""

    def __init__(self, source, multiple: int):
        self.source, self.multiple = source, multiple
        self.examples, self.rows = source.examples, source.rows

    def __call__(self, step, model=None) -> Batch:
        batch = self.source(step, model)
        rows = kdata.repack(batch.arrays, self.multiple)
        return Batch(rows, tokens=rows["input_ids"].size, metrics=batch.metrics)


class AnswerBatches(RowBatches):
    """Sequence-level KD (Kim & Rush, 2016): the rows of step s (as RowBatches) with the data
    response of the first `answer_count(cfg)` replaced by the teacher's greedy answer to the row's
    prompt (at most kd.answer_tokens, cut to data.max_length, its stop token kept); the others keep
    the data's response. The answers of every row the run reads there are generated once, before
    step 0, in batches of eval.batch_size, and kept in out_dir/teacher_answers.json, which a resumed
    run reads back."""

    def __init__(self, cfg, rows, examples: list[kdata.Example], tokenizer, teacher, path: str):
        super().__init__(rows, cfg.train.batch_size, cfg.train.seed)
        if len(examples) != self.examples:
            raise ValueError(f"{len(examples)} examples for {self.examples} rows: one example a row expected")
        self.prompts, self.responses = [e.prompt_ids for e in examples], [e.response_ids for e in examples]
        self.share = answer_count(cfg)
        self.width, self.pad = cfg.data.max_length, kdata.pad_id(tokenizer)
        self.answers = {}
        if cfg.resume and os.path.exists(path):
            with open(path) as f:
                self.answers = {int(i): a for i, a in json.load(f)["answers"].items()}
        needed = sorted({int(i) for s in range(cfg.train.steps) for i in kdata.batch_indices(
            self.examples, s, batch_size=self.batch_size, seed=self.seed)[:self.share]} - set(self.answers))
        if not needed:
            return
        t0, b = time.time(), cfg.eval.batch_size
        needed.sort(key=lambda i: len(self.prompts[i]))  # a batch of prompts of about one length: one prompt bucket
        for k in range(0, len(needed), b):
            part = needed[k:k + b]
            prompts = [list(self.prompts[i]) for i in part]
            new = sample(teacher, prompts, tokenizer=tokenizer, temperature=0.0, seed=0,
                         max_new_tokens=cfg.kd.answer_tokens, width=bucket_width(prompts))
            # each answer cut to what its own prompt leaves of the row (not to what the batch's longest leaves)
            self.answers.update({i: [int(t) for t in a[:self.width - len(p)]] for i, p, a in zip(part, prompts, new)})
            done, elapsed = k + len(part), time.time() - t0
            print(f"teacher answers: {done}/{len(needed)} prompts | {elapsed:.0f} s | "
                  f"ETA {elapsed / done * (len(needed) - done):.0f} s", flush=True)
        if jax.process_index() == 0:
            tokens = sum(len(self.answers[i]) for i in needed)
            with open(path + ".new", "w") as f:
                json.dump({"answers": {str(i): a for i, a in sorted(self.answers.items())},
                           "tokens": tokens, "seconds": round(time.time() - t0, 1)}, f)
            os.replace(path + ".new", path)

    def __call__(self, step, model=None) -> Batch:
        idx = kdata.batch_indices(self.examples, step, batch_size=self.batch_size, seed=self.seed)
        rows = completion_rows([self.prompts[i] for i in idx], [self.answers[int(i)] if k < self.share else
                                                                self.responses[i] for k, i in enumerate(idx)],
                               pad_id=self.pad, width=self.width)
        return Batch(rows, tokens=rows["input_ids"].size)


def answer_batches(cfg, splits, rows, tokenizer, teacher) -> AnswerBatches | None:
    """The teacher's answers as the run's batches (kd.teacher_answers), kept in out_dir; else None."""
    if teacher is None or not cfg.kd.teacher_answers:
        return None
    examples = kdata.tokenize(splits["train"], tokenizer, max_length=cfg.data.max_length, template=cfg.data.template,
                              on_long_prompt="skip")
    return AnswerBatches(cfg, rows["train"], examples, tokenizer, teacher, os.path.join(cfg.out_dir, ANSWERS))


def token_totals(rows) -> dict:
    """The KD / SFT normalisers: response tokens of the whole batch; all its tokens (the hidden-state
    loss's)."""
    return {"tokens": jnp.maximum(jnp.sum(rows["loss_mask"]), 1.0),
            "all_tokens": jnp.maximum(jnp.sum(rows["segment_ids"] > 0), 1.0)}


def kd_loss(params, rows, teacher_params, totals, *, graphdef, teacher_graphdef, kd, vocab_size, mesh,
            packed=False, layer_map=None):
    """Response-token loss of one micro-batch: the sum over its tokens / the batch's token count.
    With rows["teacher"] (a cached sparse teacher; teacher_params {"tail_basis"} when it has a
    low-rank tail): KD from it; else without a teacher (teacher_graphdef None): SFT's cross-entropy.
    With layer_map (the teacher layer of each student layer) and kd.hidden_weight: + that weight x
    `losses.hidden_state_loss` of the student's layers to the teacher's, over every token."""
    hidden = bool(layer_map)  # loss_of sets it only for a live teacher and kd.hidden_weight > 0
    out = hidden_and_head(graphdef, params, rows, packed=packed, layers=hidden)
    h, head = out[0], out[-1]
    common = dict(vocab_size=vocab_size, chunk_size=kd.chunk_size, mesh=mesh, normalizer=totals["tokens"])
    if "teacher" in rows:
        t = rows["teacher"]
        tail = dict(tail_coef=t["tail_coef"], tail_basis=teacher_params["tail_basis"]) if "tail_coef" in t else {}
        loss, metrics = losses.chunked_sparse_distill_loss(
            h, head, t["ids"], t["logp"], t["log_tail"], rows["targets"], rows["loss_mask"], divergence=kd.divergence,
            temperature=kd.temperature, kd_ratio=kd.kd_ratio, beta=kd.beta, alpha=kd.alpha, **tail, **common)
    elif teacher_graphdef is None:
        loss, metrics = losses.chunked_cross_entropy(h, head, rows["targets"], rows["loss_mask"], **common)
    else:
        tout = jax.tree.map(jax.lax.stop_gradient,
                            hidden_and_head(teacher_graphdef, teacher_params, rows, packed=packed, layers=hidden))
        th, thead = tout[0], tout[-1]
        loss, metrics = losses.chunked_distill_loss(h, head, th, thead, rows["targets"], rows["loss_mask"],
                                                    divergence=kd.divergence, temperature=kd.temperature,
                                                    kd_ratio=kd.kd_ratio, beta=kd.beta, alpha=kd.alpha, **common)
        if hidden:
            hl = losses.hidden_state_loss(out[1], [tout[1][j] for j in layer_map], rows["segment_ids"] > 0,
                                          totals["all_tokens"])
            loss = loss + kd.hidden_weight * hl
            metrics = {**metrics, "loss": loss, "hidden_loss": hl}
    metrics.pop("num_tokens")
    return loss, metrics


def validation(cfg, tokenizer, splits, rows):
    """Validation loss, and greedy Rouge-L on `eval.curve_samples` validation prompts."""
    from kdjax import evaluate
    records = eval_records(splits.get("valid", []), tokenizer, cfg, cfg.eval.curve_samples)

    def run(model) -> dict:
        v = evaluate.validation_loss(model, rows["valid"], batch_size=cfg.train.batch_size,
                                     chunk_size=cfg.kd.chunk_size)
        out = {"val_loss": v["loss"], "val_ppl": v["perplexity"]}
        if records:
            r = evaluate.rouge_eval(model, tokenizer, records, seeds=(0,), temperature=0.0,
                                    max_new_tokens=cfg.eval.max_new_tokens, template=cfg.data.template,
                                    batch_size=cfg.eval.batch_size)
            out.update(rougeL=r["rougeL"], rougeL_unicode=r["rougeL_unicode"])
        return out
    return run


def layer_map_of(cfg, model, teacher) -> tuple[int, ...] | None:
    """For kd.hidden_weight > 0 with a live teacher: the teacher layer each student layer was made
    of (`student_layers`), whose residual stream that layer's learns; else None."""
    if teacher is None or cfg.kd.hidden_weight <= 0:
        return None
    layer_map = tuple(parse_layers(cfg.student_layers, teacher.config.num_layers))
    if len(layer_map) != model.config.num_layers or model.config.hidden_size != teacher.config.hidden_size:
        raise ConfigError("kd.hidden_weight", f"={cfg.kd.hidden_weight}: the student's {model.config.num_layers} "
                                              f"layers of width {model.config.hidden_size} are not the teacher's "
                                              f"student_layers={cfg.student_layers!r} ({len(layer_map)} of width "
                                              f"{teacher.config.hidden_size})")
    return layer_map


def loss_of(cfg, model, teacher, mesh, tokenizer=None, cache=None):
    """The KD loss of these models as the loop's step takes it: from `teacher`, or from the sparse
    teacher each batch carries (`cache`, a teacher_cache.TeacherCache), or SFT when neither is given."""
    vocab = cache.vocab_size if cache else None if teacher is None else shared_vocab(model, teacher, tokenizer)
    layer_map = layer_map_of(cfg, model, teacher)
    return partial(kd_loss, graphdef=nnx.graphdef(model), teacher_graphdef=None if teacher is None else
                   nnx.graphdef(teacher), kd=cfg.kd, vocab_size=vocab, mesh=mesh if mesh.size > 1 else None,
                   packed=bool(cfg.data.packing or cfg.data.repack), layer_map=layer_map)


def kd_task(cfg, model, teacher, tokenizer, mesh, rows, evaluate=None, batches=None, cache=None) -> Task:
    """KD of `model` from `teacher`, or from a teacher cache (kdjax.training.teacher_cache), or SFT
    when neither is given, as the loop runs it; `batches` replaces the data rows (GKD's on-policy
    source)."""
    loss = loss_of(cfg, model, teacher, mesh, tokenizer, cache)
    b, seed = cfg.train.batch_size, cfg.train.seed
    frozen = None if teacher is None else nnx.to_pure_dict(nnx.state(teacher))
    if cache is not None and cache.tail_rank:  # the tail's basis: a constant of every step, placed once
        basis = cache.tail_basis
        frozen = {"tail_basis": jax.make_array_from_callback(basis.shape, NamedSharding(mesh, P()),
                                                             lambda idx: basis[idx])}
    batches = batches or (CachedBatches(rows["train"], b, seed, cache, mesh) if cache else
                          RowBatches(rows["train"], b, seed))
    if cfg.data.repack:
        batches = Repacked(batches, cfg.train.grad_accum * data_shards(mesh))
    return Task(name=cfg.mode, model=model, mesh=mesh, tokenizer=tokenizer, loss=loss, totals=token_totals,
                batches=batches, frozen=frozen, evaluate=evaluate)


def prepare(cfg):
    """Everything a run checks before loading a model: config, data records, tokenizer, rows, mesh."""
    from kdjax.checkpoint import load_tokenizer
    check_config(cfg)
    splits = load_splits(cfg.data)
    tokenizer = load_tokenizer(cfg.teacher)
    if tokenizer is None:
        raise ConfigError("teacher", f"={cfg.teacher}: no tokenizer next to the weights")
    rows = make_rows(cfg.data, splits, tokenizer)
    mesh = config_mesh(cfg, cfg.train.batch_size // cfg.train.grad_accum, "the micro-batch")
    print(f"data: {len(rows['train']['input_ids'])} train rows, {len(rows.get('valid', {}).get('input_ids', []))} "
          f"valid rows, {len(splits['test'])} test records; mesh {dict(mesh.shape)}", flush=True)
    return splits, tokenizer, rows, mesh


def train(cfg, *, overwrite: bool = False) -> dict:
    """Runs SFT (cfg.mode == "sft": `teacher` is the model trained) or KD as configured; returns
    {"student", "teacher" (None for SFT), "tokenizer", "splits", "rows", "mesh", "best", ...}."""
    splits, tokenizer, rows, mesh = prepare(cfg)
    resolve_steps(cfg, len(rows["train"]["input_ids"]))
    cache = None
    if cfg.mode != "sft" and cfg.kd.teacher_cache:  # checked against this run before any model loads
        cache = teacher_cache.open_for(cfg, tokenizer, rows["train"])
    run = RunDir(cfg, overwrite=overwrite)
    try:
        if cfg.mode == "sft":
            teacher, (model, _) = None, load_trained(cfg.teacher, cfg, mesh)
        elif cache:  # no teacher in memory; it is loaded only to cut the student from its layers
            teacher = None
            model = load_student(cfg, None if cfg.student else load_frozen(cfg.teacher, cfg, mesh)[0], tokenizer,
                                 mesh)
            if model.config.vocab_size < cache.vocab_size:
                raise ConfigError("student", f"={cfg.student!r} has {model.config.vocab_size} vocabulary columns, the "
                                             f"teacher cache {cache.path} {cache.vocab_size}: they must share them")
        else:
            teacher = load_frozen(cfg.teacher, cfg, mesh)[0]
            model = load_student(cfg, teacher, tokenizer, mesh)
        evaluate = validation(cfg, tokenizer, splits, rows) if cfg.train.eval_every else None
        batches = answer_batches(cfg, splits, rows, tokenizer, teacher)
        result = fit(cfg, kd_task(cfg, model, teacher, tokenizer, mesh, rows, evaluate, batches, cache), run)
    finally:
        run.close()
    return dict(student=result["model"], last=result["last"], teacher=teacher, tokenizer=tokenizer, splits=splits,
                rows=rows, mesh=mesh, best=result["best"], start_step=result["start_step"])
