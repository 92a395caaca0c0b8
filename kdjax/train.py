"""One trainer for SFT and knowledge distillation.

A step is a pure function `(state, batch, teacher) -> (state, metrics)` compiled once by `jax.jit`
with explicit shardings: parameters and optimizer state sharded by their logical axes, the batch
over ("data", "fsdp"). The loss never builds [B, T, V] logits (kdjax.losses chunked path).
Checkpoints (orbax, asynchronous) hold parameters, optimizer state, step and RNG; the data
position is the step, so `resume=True` continues exactly where a killed run stopped.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from kdjax import data as kdata
from kdjax import losses
from kdjax.checkpoint import load
from kdjax.model import Qwen2
from kdjax.sharding import make_mesh


class TrainingDiverged(RuntimeError):
    pass


# ---- models ------------------------------------------------------------------------------------
def parse_layers(spec: str, num_layers: int) -> list[int]:
    """Which teacher layers make the student.

    "every_other" -> [0, 2, 4, ...]; "first_last:N" -> the first ceil(N/2) and the last floor(N/2)
    layers (for SmolLM2 this half keeps far more of the teacher than every other layer: validation
    loss 10.0 vs 14.6 nats before training); "0,3,5" -> those indices.
    """
    if spec == "every_other":
        return list(range(0, num_layers, 2))
    try:
        if str(spec).startswith("first_last:"):
            n = int(spec.split(":", 1)[1])
            if not 0 < n <= num_layers:
                raise ValueError
            layers = list(range((n + 1) // 2)) + list(range(num_layers - n // 2, num_layers))
        else:
            layers = [int(x) for x in str(spec).split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--config.student_layers={spec!r}: expected 'every_other', 'first_last:N' with "
                         f"0 < N <= {num_layers}, or a comma list of ints") from None
    bad = [i for i in layers if not 0 <= i < num_layers]
    if not layers or bad:
        raise ValueError(f"--config.student_layers={spec!r}: indices must lie in [0, {num_layers}) (bad: {bad})")
    return layers


def student_from_teacher(teacher: Qwen2, layers: list[int], **config) -> Qwen2:
    """A student made of the given teacher layers (DistilBERT style): embeddings, norm, head and
    the chosen decoder layers are copied. `config`: ModelConfig fields that differ from the
    teacher's (param_dtype: the student's master weights when the teacher is kept in bf16)."""
    cfg = teacher.config.replace(num_layers=len(layers), **config)
    student = nnx.eval_shape(lambda: Qwen2(cfg))
    graphdef, state = nnx.split(student)
    src = nnx.to_pure_dict(nnx.state(teacher))
    dst = dict(src)
    dst["layers"] = {i: src["layers"][j] for i, j in enumerate(layers)}
    dtypes = nnx.to_pure_dict(state)
    # the student owns its buffers, in its own parameter dtype
    dst = jax.tree.map(lambda x, like: jnp.array(x, dtype=like.dtype, copy=True), dst, dtypes)
    nnx.replace_by_pure_dict(state, dst)
    return nnx.merge(graphdef, state)


def teacher_param_dtype(cfg) -> str:
    """The KD teacher gets no gradients: its weights are kept in the compute dtype unless
    `teacher_param_dtype` says otherwise (a 3B teacher: 6.2 GB in bf16 instead of 12.3 GB fp32)."""
    return cfg.get("teacher_param_dtype") or cfg.dtype


def load_models(cfg, mesh):
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, mesh=mesh, remat=cfg.remat,
              remat_policy=cfg.get("remat_policy"), attention=cfg.get("attention"))
    if cfg.mode == "sft":  # the "teacher" is the model being trained
        teacher, tokenizer = load(cfg.teacher, **kw)
    else:
        teacher, tokenizer = load(cfg.teacher, **dict(kw, param_dtype=teacher_param_dtype(cfg), remat=False))
    if tokenizer is None:
        raise ValueError(f"--config.teacher={cfg.teacher}: no tokenizer next to the weights")
    if cfg.mode == "sft":
        return None, teacher, tokenizer
    if cfg.student:
        student, _ = load(cfg.student, **kw)
    else:
        student = student_from_teacher(teacher, parse_layers(cfg.student_layers, teacher.config.num_layers),
                                       param_dtype=cfg.param_dtype, remat=cfg.remat)
    sv, tv = student.config.vocab_size, teacher.config.vocab_size
    if sv != tv and min(sv, tv) < len(tokenizer):
        raise ValueError(f"teacher vocab {tv} and student vocab {sv} differ beyond padding (tokenizer has "
                         f"{len(tokenizer)} tokens): they must share a tokenizer")
    return teacher, student, tokenizer


# ---- data --------------------------------------------------------------------------------------
def load_data(dcfg, tokenizer, max_context: int):
    if dcfg.source:
        records = kdata.load_records(dcfg.source, dcfg.layout, limit=dcfg.limit or None)
    else:
        records = kdata.python_function_records(limit=dcfg.stdlib_pairs or None)
    if dcfg.limit:
        records = records[:dcfg.limit]
    splits = kdata.split_records(records, seed=dcfg.seed, valid=dcfg.valid, test=dcfg.test)
    if dcfg.max_length > max_context:
        raise ValueError(f"--config.data.max_length={dcfg.max_length} exceeds the model context of {max_context}")
    rows = {k: kdata.make_rows(v, tokenizer, max_length=dcfg.max_length, template=dcfg.template,
                               on_long_prompt="skip") for k, v in splits.items() if k != "test" and v}
    return splits, rows


# ---- the step ----------------------------------------------------------------------------------
def make_optimizer(tc) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=tc.lr, warmup_steps=tc.warmup_steps,
        decay_steps=max(tc.steps, tc.warmup_steps + 1), end_value=tc.lr * tc.min_lr_ratio)
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # no decay on norms, biases
    return optax.chain(optax.clip_by_global_norm(tc.clip_norm),
                       optax.adamw(schedule, b1=tc.get("b1", 0.9), b2=tc.get("b2", 0.95), eps=tc.get("eps", 1e-8),
                                   weight_decay=tc.weight_decay, mask=decay_mask))


def _forward(graphdef, params, batch):
    model = nnx.merge(graphdef, params)
    # Each row holds one sequence padded on the right (kdjax.data.make_rows), so causal attention
    # alone is exact for every real token (padding comes after them; its outputs carry no loss),
    # and fused attention kernels run their causal mask, not a [B, T, T] bias.
    h = model.hidden_states(batch["input_ids"], positions=batch["positions"])
    return h, model.head_kernel()


def loss_fn(params, batch, teacher_params, *, graphdef, teacher_graphdef, kd, vocab_size, mesh, normalizer):
    """Response-token loss of one micro-batch: sum over its tokens / `normalizer` (global count)."""
    h, head = _forward(graphdef, params, batch)
    common = dict(vocab_size=vocab_size, chunk_size=kd.chunk_size, mesh=mesh, normalizer=normalizer)
    if teacher_graphdef is None:
        return losses.chunked_cross_entropy(h, head, batch["targets"], batch["loss_mask"], **common)
    th, thead = jax.tree.map(jax.lax.stop_gradient, _forward(teacher_graphdef, teacher_params, batch))
    return losses.chunked_distill_loss(h, head, th, thead, batch["targets"], batch["loss_mask"],
                                       divergence=kd.divergence, temperature=kd.temperature,
                                       kd_ratio=kd.kd_ratio, beta=kd.beta, alpha=kd.alpha, **common)


def train_step(state, batch, teacher_params, *, tx, accum, **loss_kw):
    """(state, batch [B, T], teacher params) -> (state, metrics); `accum` micro-batches of B/accum
    rows each, gradients summed, loss normalised by the response tokens of the whole batch."""
    params = state["params"]
    normalizer = jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)
    # Row r = m * accum + a goes to micro-batch a: every micro-batch keeps the batch sharding.
    micro = jax.tree.map(lambda x: x.reshape(-1, accum, *x.shape[1:]).swapaxes(0, 1), batch)
    grad_fn = jax.value_and_grad(partial(loss_fn, normalizer=normalizer, **loss_kw), has_aux=True)

    def one(grads, mb):
        (_, metrics), g = grad_fn(params, mb, teacher_params)
        return jax.tree.map(jnp.add, grads, g), metrics

    grads, metrics = jax.lax.scan(one, jax.tree.map(jnp.zeros_like, params), micro)
    metrics = jax.tree.map(jnp.sum, metrics)  # each micro-batch already divided by the global count
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    params = optax.apply_updates(params, updates)
    metrics["grad_norm"] = optax.global_norm(grads)
    metrics["param_norm"] = optax.global_norm(params)  # inf/NaN here: the update broke the weights
    return dict(params=params, opt_state=opt_state, step=state["step"] + 1), metrics


def config_mesh(cfg, rows: int, what: str):
    """The mesh of cfg.mesh; `rows` (a micro-batch, `what` in the error) must split over its
    data * fsdp devices."""
    devices = jax.devices()[:cfg.mesh.num_devices] if cfg.mesh.num_devices else None
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices=devices)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if rows % shards:
        raise ValueError(f"{what}, {rows} rows, does not split over the {shards} data*fsdp devices; change "
                         f"--config.train.batch_size or the mesh")
    return mesh


def init_state(model, tx, mesh):
    """(graphdef, state, state shardings) of a model to train: state = {params (plain dict), AdamW
    state, step}. Adam's moments are sharded exactly like their parameters (FSDP shards optimizer
    state too); scalars (step, Adam's count) are replicated on every device."""
    graphdef, params = nnx.split(model)
    params = nnx.to_pure_dict(params)
    replicated = NamedSharding(mesh, P())
    params = jax.tree.map(lambda x: x if isinstance(x.sharding, NamedSharding) else jax.device_put(x, replicated),
                          params)
    opt_sh = optax.tree_map_params(tx, lambda _, p: p.sharding, jax.eval_shape(tx.init, params), params,
                                   transform_non_params=lambda _: replicated)
    state = dict(params=params, opt_state=jax.jit(tx.init, out_shardings=opt_sh)(params),
                 step=jax.device_put(jnp.zeros((), jnp.int32), replicated))
    return graphdef, state, jax.tree.map(lambda x: x.sharding, state)


# ---- checkpoints -------------------------------------------------------------------------------
def checkpoint_manager(out_dir, tc):
    import orbax.checkpoint as ocp
    opts = ocp.CheckpointManagerOptions(max_to_keep=tc.keep_checkpoints, enable_async_checkpointing=True,
                                        create=True)
    return ocp.CheckpointManager(os.path.abspath(os.path.join(out_dir, "checkpoints")), options=opts)


def save_checkpoint(mngr, state, meta):
    import orbax.checkpoint as ocp
    mngr.save(int(state["step"]), args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                          meta=ocp.args.JsonSave(meta)))


def resume(cfg, state):
    """(checkpoint manager of out_dir, state, first step): with cfg.resume, the latest checkpoint."""
    mngr = checkpoint_manager(cfg.out_dir, cfg.train)
    if not cfg.resume:
        return mngr, state, 0
    restored, _ = restore_checkpoint(mngr, state)
    if restored is None:
        print(f"resume: no checkpoint in {cfg.out_dir}/checkpoints, starting at step 0", flush=True)
        return mngr, state, 0
    print(f"resumed from {cfg.out_dir}/checkpoints step {int(restored['step'])}", flush=True)
    return mngr, restored, int(restored["step"])


def check_finite(metrics, step, mngr, out_dir, last_good):
    """Stops with TrainingDiverged (naming the step and the last good checkpoint) on inf/NaN."""
    if not all(math.isfinite(metrics[k]) for k in ("loss", "grad_norm", "param_norm")):
        mngr.wait_until_finished()
        raise TrainingDiverged(
            f"loss {metrics['loss']}, grad norm {metrics['grad_norm']}, parameter norm {metrics['param_norm']} "
            f"at step {step}: not finite, stopped. The last good checkpoint is step {last_good} in "
            f"{out_dir}/checkpoints (resume=True continues from it; lower --config.train.lr?)")


def end_of_step(progress, mngr, state, done, metrics, tokens, cfg, meta) -> bool:
    """The on-policy loops' (GRPO, MiniLLM) log line every log_every steps and checkpoint every
    checkpoint_every steps (and at the last); True when a checkpoint was written."""
    tc = cfg.train
    if done % tc.log_every == 0 or done == tc.steps:
        progress.log(done, metrics, tokens=tokens)
    else:
        progress.tokens += tokens
    if done % tc.checkpoint_every == 0 or done == tc.steps:
        save_checkpoint(mngr, state, {**meta, "step": done})
        return True
    return False


def restore_checkpoint(mngr, state):
    import orbax.checkpoint as ocp
    step = mngr.latest_step()
    if step is None:
        return None, None
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                     meta=ocp.args.JsonRestore()))
    return out["state"], out["meta"]


# ---- logging -----------------------------------------------------------------------------------
class Progress:
    """One line per log step: step, loss, tokens/s, ETA; metrics to JSONL and TensorBoard."""

    def __init__(self, out_dir, total_steps, start_step):
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.total, self.start, self.t0 = total_steps, start_step, time.time()
        self.tokens = 0
        if os.path.exists(self.path) and jax.process_index() == 0:  # a resumed run drops rows logged after its checkpoint
            rows = [json.loads(l) for l in open(self.path) if l.strip()]
            with open(self.path, "w") as f:
                for r in rows:
                    if r.get("step", 0) <= start_step:
                        f.write(json.dumps(r) + "\n")
        self.tb = None
        if jax.process_index() == 0:
            try:
                from tensorboardX import SummaryWriter
                self.tb = SummaryWriter(os.path.join(out_dir, "tensorboard"))
            except ImportError:  # TensorBoard logging is optional
                pass

    def log(self, step, metrics, tokens=0, echo=True):
        self.tokens += tokens
        if jax.process_index() != 0:  # multi-host: one process writes the logs
            return
        row = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k != "step":
                    self.tb.add_scalar(k, v, step)
        if echo:
            elapsed = time.time() - self.t0
            done = step - self.start
            rate = self.tokens / max(elapsed, 1e-9)
            eta = elapsed / max(done, 1) * (self.total - step)
            parts = " ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k not in ("num_tokens",))
            print(f"step {step}/{self.total} {parts} | {rate:,.0f} tok/s | ETA {_hms(eta)}", flush=True)

    def close(self):
        if self.tb is not None:
            self.tb.close()


def _hms(s):
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# ---- the loop ----------------------------------------------------------------------------------
def _batch_sharding(mesh):
    return NamedSharding(mesh, P(("data", "fsdp")))


# ---- the best model on the validation split (MiniLLM keeps the best checkpoint by dev Rouge-L) --
SELECT = {"rougeL": max, "val_loss": min}
BEST = "best"  # out_dir/best: a kdjax checkpoint + best.json


def read_best(out_dir) -> dict | None:
    """{"step", "metric", "value"} of out_dir/best, or None. A save killed before its final rename
    left a complete out_dir/best.new (best.json is written last): that one is taken."""
    path, new = os.path.join(out_dir, BEST), os.path.join(out_dir, BEST + ".new")
    if not os.path.exists(os.path.join(path, "best.json")) and os.path.exists(os.path.join(new, "best.json")):
        shutil.rmtree(path, ignore_errors=True)
        os.replace(new, path)
    try:
        with open(os.path.join(path, "best.json")) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def save_best(out_dir, model, tokenizer, info: dict) -> dict:
    """Writes `model` to out_dir/best (via best.new, so a kill never leaves a half-written best)."""
    from kdjax.checkpoint import save
    path, new = os.path.join(out_dir, BEST), os.path.join(out_dir, BEST + ".new")
    shutil.rmtree(new, ignore_errors=True)
    save(model, new, format="kdjax", tokenizer=tokenizer)
    with open(os.path.join(new, "best.json"), "w") as f:
        json.dump(info, f)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(new, path)
    return info


def train(cfg) -> dict:
    """Runs SFT or KD as configured; returns {"student": model, "teacher": model|None, ...}."""
    tc = cfg.train
    if tc.batch_size % tc.grad_accum:
        raise ValueError(f"--config.train.batch_size={tc.batch_size} must divide by grad_accum={tc.grad_accum}")
    select = tc.get("select_best", "")
    if select and select not in SELECT:
        raise ValueError(f"--config.train.select_best={select!r}: expected '' (keep the last step), "
                         f"{' or '.join(map(repr, SELECT))}")
    if select and not (tc.eval_every and cfg.data.valid):
        raise ValueError(f"--config.train.select_best={select!r} needs validation evals: set "
                         f"--config.train.eval_every and --config.data.valid")
    if select == "rougeL" and not cfg.eval.curve_samples:
        raise ValueError("--config.train.select_best='rougeL' needs --config.eval.curve_samples > 0 "
                         "(validation prompts scored at every eval)")
    mesh = config_mesh(cfg, tc.batch_size // tc.grad_accum, "the micro-batch")
    os.makedirs(cfg.out_dir, exist_ok=True)
    teacher, student, tokenizer = load_models(cfg, mesh)
    splits, rows = load_data(cfg.data, tokenizer, student.config.max_position_embeddings)
    train_rows = rows["train"]
    print(f"data: {len(train_rows['input_ids'])} train rows, {len(rows.get('valid', {}).get('input_ids', []))} "
          f"valid rows, {len(splits['test'])} test records; mesh {dict(mesh.shape)}", flush=True)
    if tc.get("epochs", 0):
        tc.steps = max(1, math.ceil(tc.epochs * len(train_rows["input_ids"]) / tc.batch_size))
        print(f"train.epochs={tc.epochs}: {tc.steps} steps of {tc.batch_size} rows", flush=True)

    tx = make_optimizer(tc)
    graphdef, state, state_sh = init_state(student, tx, mesh)
    tgraph, tparams = (None, None) if teacher is None else (nnx.graphdef(teacher), nnx.to_pure_dict(nnx.state(teacher)))
    vocab = min(student.config.vocab_size, teacher.config.vocab_size) if teacher is not None else None
    loss_kw = dict(graphdef=graphdef, teacher_graphdef=tgraph, kd=cfg.kd, vocab_size=vocab,
                   mesh=mesh if mesh.size > 1 else None)
    step_fn = jax.jit(partial(train_step, tx=tx, accum=tc.grad_accum, **loss_kw),
                      in_shardings=(state_sh, _batch_sharding(mesh), None if tparams is None else
                                    jax.tree.map(lambda x: x.sharding, tparams)),
                      out_shardings=(state_sh, None), donate_argnums=0)

    mngr, state, start = resume(cfg, state)
    best = read_best(cfg.out_dir) if select and cfg.resume else None
    if select and not cfg.resume:
        shutil.rmtree(os.path.join(cfg.out_dir, BEST), ignore_errors=True)  # a fresh run's own best only
    progress = Progress(cfg.out_dir, tc.steps, start)
    last_good = start
    meta = {"config": cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)}
    window = []
    for step in range(start, tc.steps):
        batch = kdata.batch_at(train_rows, step, batch_size=tc.batch_size, seed=tc.seed)
        batch = jax.device_put({k: batch[k] for k in kdata.ROW_KEYS}, _batch_sharding(mesh))
        new_state, metrics = step_fn(state, batch, tparams)
        metrics = jax.device_get(metrics)
        check_finite(metrics, step + 1, mngr, cfg.out_dir, last_good)
        state = new_state
        done = step + 1
        metrics.pop("num_tokens")
        window.append(metrics)
        if done % tc.log_every == 0 or done == tc.steps:
            avg = {k: float(np.mean([w[k] for w in window])) for k in metrics}
            progress.log(done, avg, tokens=len(window) * train_rows["input_ids"][:tc.batch_size].size)
            window = []
        if tc.eval_every and done % tc.eval_every == 0 and "valid" in rows and jax.process_count() == 1:
            ev = periodic_eval(cfg, nnx.merge(graphdef, state["params"]), tokenizer, splits, rows)
            progress.log(done, ev)
            if select in ev and (best is None or SELECT[select](ev[select], best["value"]) != best["value"]):
                best = save_best(cfg.out_dir, nnx.merge(graphdef, state["params"]), tokenizer,
                                 dict(step=done, metric=select, value=ev[select]))
                print(f"best so far: step {done}, validation {select} {ev[select]:.4g} -> {cfg.out_dir}/{BEST}",
                      flush=True)
        if done % tc.checkpoint_every == 0 or done == tc.steps:
            save_checkpoint(mngr, state, {**meta, "step": done})
            last_good = done
    mngr.wait_until_finished()
    mngr.close()
    progress.close()
    final = nnx.merge(graphdef, state["params"])
    return dict(student=final, teacher=teacher, tokenizer=tokenizer, splits=splits, rows=rows, mesh=mesh,
                start_step=start, best=best)


def eval_records(records, tokenizer, cfg, n: int):
    """The first `n` records whose prompt fits in data.max_length tokens (as in training)."""
    out = []
    for r in records:
        if len(out) >= n:
            break
        prompt = kdata.render_prompt(r, cfg.data.template, tokenizer)
        if len(tokenizer.encode(prompt, add_special_tokens=False)) < cfg.data.max_length:
            out.append(r)
    return out


def periodic_eval(cfg, model, tokenizer, splits, rows) -> dict:
    """Validation loss, and greedy Rouge-L on a few validation prompts (the curves' right panel)."""
    from kdjax import evaluate
    v = evaluate.validation_loss(model, rows["valid"], batch_size=cfg.train.batch_size, chunk_size=cfg.kd.chunk_size)
    out = {"val_loss": v["loss"], "val_ppl": v["perplexity"]}
    records = eval_records(splits["valid"], tokenizer, cfg, cfg.eval.curve_samples)
    if records:
        r = evaluate.rouge_eval(model, tokenizer, records, seeds=(0,), temperature=0.0,
                                max_new_tokens=cfg.eval.max_new_tokens, template=cfg.data.template,
                                batch_size=cfg.eval.batch_size)
        out.update(rougeL=r["rougeL"], rougeL_unicode=r["rougeL_unicode"])
    return out


# ---- train, then evaluate and report -----------------------------------------------------------
def run(cfg, trainer=None) -> str:
    """`kdjax distill` / `kdjax sft` (and `kdjax minillm`, whose `trainer` is kdjax.minillm's):
    train, save the model, score it on the test split against the teacher (and the untrained
    student), write report.md / report.json / curves.png."""
    from kdjax import evaluate
    from kdjax.checkpoint import save

    result = (trainer or train)(cfg)
    model, teacher, tokenizer = result["student"], result["teacher"], result["tokenizer"]
    kd = cfg.mode != "sft"  # distill, minillm
    after = "student after KD" if kd else "after SFT"
    if result["best"]:
        b = result["best"]
        model = load(os.path.join(cfg.out_dir, BEST), dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                     mesh=result["mesh"])[0]
        after += f" (step {b['step']}: best validation {b['metric']})"
        print(f"selected step {b['step']} of {cfg.train.steps} (validation {b['metric']} {b['value']:.4g})", flush=True)
    name = "student" if kd else "sft"
    out = os.path.join(cfg.out_dir, name)
    save(model, out, format="hf", tokenizer=tokenizer)
    print(f"saved {out} (HF safetensors)", flush=True)
    ec = cfg.eval
    if jax.process_count() > 1:
        print(f"multi-host run: score the saved model with `kdjax eval --model={out}` on one host", flush=True)
        return cfg.out_dir
    records = eval_records(result["splits"]["test"], tokenizer, cfg, ec.num_samples)
    results = {}
    if records:
        kw = dict(max_length=cfg.data.max_length, template=cfg.data.template, batch_size=ec.batch_size,
                  seeds=[int(s) for s in str(ec.seeds).split(",")], temperature=ec.temperature,
                  top_p=ec.top_p, max_new_tokens=ec.max_new_tokens, log=lambda m: print(m, flush=True))
        todo = []
        if kd:
            if ec.before:
                todo.append(("teacher", lambda: teacher))
                if cfg.student:
                    todo.append(("student before KD", lambda: load(cfg.student, dtype=cfg.dtype)[0]))
                else:
                    todo.append(("student before KD", lambda: student_from_teacher(
                        teacher, parse_layers(cfg.student_layers, teacher.config.num_layers))))
            todo.append((after, lambda: model))
        else:
            if ec.before:
                todo.append(("before SFT", lambda: load(cfg.teacher, dtype=cfg.dtype)[0]))
            todo.append((after, lambda: model))
        for label, get in todo:
            t0 = time.time()
            results[label] = evaluate.evaluate(get(), tokenizer, records, **kw)
            print(f"evaluated {label}: Rouge-L {results[label]['rougeL']:.2f} ({time.time() - t0:.0f}s)", flush=True)
        table = evaluate.report(results, teacher="teacher" if "teacher" in results else None, out_dir=cfg.out_dir)
        print("\n" + table, flush=True)
    metrics = os.path.join(cfg.out_dir, "metrics.jsonl")
    if os.path.exists(metrics):
        png = evaluate.plot_curves(metrics, os.path.join(cfg.out_dir, "curves.png"))
        print(f"curves: {png}")
    return cfg.out_dir
