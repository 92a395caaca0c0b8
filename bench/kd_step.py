"""Benchmark: one KD train step of kdjax (kdjax.training.state.update with distill.kd_loss), as the anchor ../shared/bench/torch_kd.py.

A student (default Qwen2.5-0.5B config) learns a teacher (default Qwen2.5-3B config) with forward KL
on random tokens; random weights (speed does not depend on their values), built directly on the
device(s) with their shardings by a jitted init (no host copy). bf16 compute, fp32 master weights
by default, AdamW (kdjax.training.state.make_optimizer), the chunked vocabulary-sharded loss.

Measures: compile time, then `--warmup` untimed steps, then `--steps` timed steps (each waited for
with block_until_ready; the median is reported, as the anchor does). Prints one JSON line:
  tokens_per_s      batch * seq / median step time
  model_tflops      (6 N_student + 2 N_teacher) * tokens / step time: the anchor's `tflops`
                    (N counts every parameter, a tied embedding once; attention ignored)
  mfu               model_tflops / --peak_tflops (default 989 = H100 SXM bf16 dense)
  attn_tflops       causal attention matmuls on top (2 T H hd FLOPs a token a layer forward,
                    x3 for the student's forward + backward, x1 for the teacher)
  mfu_with_attn     (model + attention FLOPs) / peak
  peak_gib          device.memory_stats()["peak_bytes_in_use"] (max over devices; GPU/TPU), null
                    where the backend has no memory stats (CPU)
  xla_*_gib         XLA's compiled memory analysis of the step, per device: arguments, outputs,
                    aliased (donated) bytes, temporaries; xla_peak_gib = arg + out - alias + temp
  saved_activation_gib  activations JAX keeps from the student's forward for its backward (vjp
                    residuals that are not inputs, one micro-batch, all devices): backend independent
  profile           with --profile=DIR: the busiest events of a jax.profiler trace of the timed steps
`--compile_only` compiles on abstract inputs (jax.ShapeDtypeStruct with shardings; nothing is
allocated) and reports compile time and the memory analysis only: the memory side of a config
on a machine that could not hold it.

  python bench/kd_step.py                                   # 0.5B <- 3B, batch 16 x 1024
  python bench/kd_step.py --teacher=qwen2.5-1.5b --batch=8  # the second anchor configuration
  python bench/kd_step.py --profile=/tmp/kd_profile          # + where the time goes
  python bench/kd_step.py --student=tiny-qwen2 --teacher=tiny-qwen2 --batch=2 --seq=64 --steps=2
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import glob
import gzip
import json
import math
import os
import statistics
import sys
import time
from functools import partial

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from kdjax.training import distill, state as train_state  # noqa: E402
from kdjax.config import ATTENTION_IMPLS, REMAT_POLICIES, ModelConfig  # noqa: E402
from kdjax.model import Qwen2  # noqa: E402
from kdjax.sharding import make_mesh, state_shardings  # noqa: E402

GIB = 2 ** 30


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", default="qwen2.5-0.5b", help="ModelConfig preset of the student")
    ap.add_argument("--teacher", default="qwen2.5-3b", help="ModelConfig preset of the teacher")
    ap.add_argument("--batch", type=int, default=16, help="rows per step (global)")
    ap.add_argument("--seq", type=int, default=1024, help="tokens per row")
    ap.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    ap.add_argument("--chunk_size", type=int, default=1024, help="tokens per chunk of the KD loss")
    ap.add_argument("--remat", action=argparse.BooleanOptionalAction, default=True,
                    help="rematerialise each student decoder layer in the backward pass (without it the "
                    "0.5B student saves ~87 GiB of activations at batch 16 x 1024: docs/benchmarks.md)")
    ap.add_argument("--remat_policy", default="nothing_saveable", choices=REMAT_POLICIES,
                    help="what --remat keeps (jax.checkpoint_policies): nothing_saveable recomputes the whole "
                    "layer; dots_with_no_batch_dims_saveable keeps the projections and recomputes attention")
    ap.add_argument("--attention", default="auto", choices=ATTENTION_IMPLS,
                    help="attention of both models (kdjax.config): auto = cudnn on a GPU, xla elsewhere")
    ap.add_argument("--grad_accum", type=int, default=1, help="micro-batches per step")
    ap.add_argument("--divergence", default="forward_kl", help="kdjax.losses divergence name")
    ap.add_argument("--dtype", default="bfloat16", help="compute dtype (both models)")
    ap.add_argument("--param_dtype", default="float32", help="student weights and AdamW moments "
                    "(float32 = fp32 master weights; bfloat16 as the PyTorch anchor)")
    ap.add_argument("--teacher_param_dtype", default="bfloat16", help="teacher weights (no gradients)")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--data", type=int, default=-1, help="mesh axis 'data' (-1: remaining devices)")
    ap.add_argument("--fsdp", type=int, default=1, help="mesh axis 'fsdp'")
    ap.add_argument("--tensor", type=int, default=1, help="mesh axis 'tensor'")
    ap.add_argument("--num_devices", type=int, default=0, help="use the first N devices (0 = all)")
    ap.add_argument("--peak_tflops", type=float, default=989.0,
                    help="peak TFLOP/s a device for MFU (989 = H100 SXM bf16 dense)")
    ap.add_argument("--compile_only", action="store_true",
                    help="compile on abstract inputs and report compile time and memory analysis only")
    ap.add_argument("--profile", default="", help="write a jax.profiler trace of the timed steps to this "
                    "directory (xprof/TensorBoard, Perfetto) and add its busiest events to the JSON line")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if a.attention == "auto":  # as kdjax.model.attend resolves it, named in the JSON line
        a.attention = "cudnn" if jax.default_backend() == "gpu" and a.dtype in ("bfloat16", "float16") else "xla"
    if a.batch % a.grad_accum:
        ap.error(f"--batch={a.batch} must divide by --grad_accum={a.grad_accum}")
    if min(a.batch, a.seq, a.chunk_size) < 1 or a.steps < 1 or a.warmup < 0:
        ap.error("--batch, --seq, --chunk_size, --steps must be >= 1 and --warmup >= 0")
    return a


# ---- models, optimizer state and batch, born on their devices ------------------------------
def model_parts(preset, mesh, **overrides):
    """(config, graphdef, abstract params, param shardings, jitted init) for a preset; params
    are plain dicts (as kdjax.training uses them)."""
    cfg = ModelConfig.preset(preset, **overrides)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Qwen2(cfg)))
    shardings = nnx.to_pure_dict(state_shardings(abstract, mesh))
    abstract = placed(nnx.to_pure_dict(abstract), shardings)
    init = jax.jit(lambda key: nnx.to_pure_dict(nnx.state(Qwen2(cfg, rngs=nnx.Rngs(params=key)))),
                   out_shardings=shardings)
    return cfg, graphdef, abstract, shardings, init


def batch_of(key, batch, seq, vocab):
    """Random token rows in kdjax.data's layout: every token is a response token."""
    ids = jax.random.randint(key, (batch, seq + 1), 0, vocab, jnp.int32)
    ones = jnp.ones((batch, seq), jnp.int32)
    return dict(input_ids=ids[:, :-1], targets=ids[:, 1:], loss_mask=ones.astype(jnp.float32),
                segment_ids=ones, positions=jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq)))


def placed(tree, shardings):
    """Abstract arrays (jax.ShapeDtypeStruct) of `tree` laid out with `shardings`: nothing allocated."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


# ---- numbers ---------------------------------------------------------------------------------
def attention_flops_per_token(cfg: ModelConfig, seq: int) -> float:
    """Causal QK^T and PV matmuls of one forward pass per token: 2 * 2 * (seq / 2) * H * hd a layer."""
    return 2.0 * seq * cfg.num_heads * cfg.head_dim * cfg.num_layers


def saved_activation_bytes(loss, params, *rest) -> int:
    """Bytes that JAX keeps from the student's forward pass for its backward pass: the residuals of
    `jax.vjp(loss, params)` that are not inputs (weights, batch, teacher are not counted), at the
    dtypes of the program, whole batch over all devices. Backend independent (a jaxpr, before
    XLA's scheduling and fusion), the part of the peak that remat and fused attention control."""
    closed, shapes = jax.make_jaxpr(lambda p, *r: jax.vjp(lambda q: loss(q, *r), p),
                                    return_shape=True)(params, *rest)
    outvars = closed.jaxpr.outvars
    residuals = outvars[len(outvars) - len(jax.tree.leaves(shapes[1])):]
    inputs = {id(v) for v in closed.jaxpr.invars}
    seen, total = set(), 0
    for v in residuals:
        if id(v) in inputs or id(v) in seen:
            continue
        seen.add(id(v))
        total += math.prod(v.aval.shape) * v.aval.dtype.itemsize
    return total


def memory_analysis(compiled) -> dict:
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - a backend without it
        m = None
    if m is None:
        return {}
    out = dict(xla_arg_gib=m.argument_size_in_bytes, xla_out_gib=m.output_size_in_bytes,
               xla_alias_gib=m.alias_size_in_bytes, xla_temp_gib=m.temp_size_in_bytes)
    out["xla_peak_gib"] = out["xla_arg_gib"] + out["xla_out_gib"] - out["xla_alias_gib"] + out["xla_temp_gib"]
    return {k: round(v / GIB, 3) for k, v in out.items()}


def device_peak_gib(devices):
    peaks = []
    for d in devices:
        try:
            stats = d.memory_stats()
        except Exception:  # noqa: BLE001 - CPU backends may raise or return None
            stats = None
        if stats and "peak_bytes_in_use" in stats:
            peaks.append(stats["peak_bytes_in_use"])
    return round(max(peaks) / GIB, 3) if peaks else None


def profile_summary(directory, top=12, lanes=4) -> dict:
    """Where the time goes in a jax.profiler trace: for the busiest `lanes` threads of the device
    processes (all processes when there is no "/device:" one, as on CPU), the `top` events by
    total time: {"process / thread": [[event, total ms, share of the lane], ...]}."""
    files = sorted(glob.glob(os.path.join(directory, "plugins", "profile", "*", "*.trace.json.gz")))
    if not files:
        return {}
    with gzip.open(files[-1]) as f:
        events = json.load(f)["traceEvents"]
    names = {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") in ("process_name", "thread_name"):
            names[(e["pid"], e.get("tid") if e["name"] == "thread_name" else None)] = e["args"]["name"]
    device = {pid for (pid, tid), n in names.items() if tid is None and n.startswith("/device:")}
    lanes_time = collections.defaultdict(collections.Counter)
    for e in events:
        if e.get("ph") == "X" and (not device or e["pid"] in device):
            lane = f"{names.get((e['pid'], None), e['pid'])} / {names.get((e['pid'], e.get('tid')), e.get('tid'))}"
            lanes_time[lane][e["name"]] += e.get("dur", 0) / 1000
    busiest = sorted(lanes_time, key=lambda k: -sum(lanes_time[k].values()))[:lanes]
    return {lane: [[name, round(ms, 3), round(ms / max(sum(lanes_time[lane].values()), 1e-9), 4)]
                   for name, ms in lanes_time[lane].most_common(top)] for lane in busiest}


def main(argv=None, quiet=False):
    """Runs the benchmark; prints its JSON line (unless `quiet`) and returns it as a dict."""
    a = parse_args(argv)
    devices = jax.devices()[:a.num_devices] if a.num_devices else jax.devices()
    mesh = make_mesh(a.data, a.fsdp, a.tensor, devices=devices)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if (a.batch // a.grad_accum) % shards:
        raise SystemExit(f"--batch={a.batch} / --grad_accum={a.grad_accum} rows do not split over the "
                         f"{shards} data*fsdp devices of the mesh {dict(mesh.shape)}")

    s_cfg, graphdef, s_abs, s_sh, s_init = model_parts(a.student, mesh, dtype=a.dtype, param_dtype=a.param_dtype,
                                                       remat=a.remat, remat_policy=a.remat_policy,
                                                       attention=a.attention)
    t_cfg, t_graphdef, t_abs, t_sh, t_init = model_parts(a.teacher, mesh, dtype=a.dtype, attention=a.attention,
                                                         param_dtype=a.teacher_param_dtype)
    vocab = min(s_cfg.vocab_size, t_cfg.vocab_size)

    tc = ml_collections.ConfigDict(dict(lr=a.lr, warmup_steps=1, steps=max(a.warmup + a.steps, 2),
                                        min_lr_ratio=0.1, weight_decay=0.01, clip_norm=1.0, b1=0.9, b2=0.95,
                                        eps=1e-8))
    kd = ml_collections.ConfigDict(dict(divergence=a.divergence, temperature=1.0, kd_ratio=1.0, beta=0.5,
                                        alpha=0.1, chunk_size=a.chunk_size))
    tx = train_state.make_optimizer(tc)
    replicated = NamedSharding(mesh, P())
    opt_abs = jax.eval_shape(tx.init, s_abs)
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, opt_abs, s_sh, transform_non_params=lambda _: replicated)
    state_sh = dict(params=s_sh, opt_state=opt_sh, step=replicated)
    batch_sh = NamedSharding(mesh, P(("data", "fsdp")))

    loss_kw = dict(graphdef=graphdef, teacher_graphdef=t_graphdef, kd=kd, vocab_size=vocab,
                   mesh=mesh if mesh.size > 1 else None)
    loss = partial(distill.kd_loss, **loss_kw)
    step_fn = jax.jit(partial(train_state.update, tx=tx, loss=loss, totals=distill.token_totals, accum=a.grad_accum),
                      in_shardings=(state_sh, batch_sh, t_sh), out_shardings=(state_sh, None), donate_argnums=0)
    make_batch = jax.jit(partial(batch_of, batch=a.batch, seq=a.seq, vocab=vocab), out_shardings=batch_sh)

    key_s, key_t, key_b = jax.random.split(jax.random.key(a.seed), 3)
    if a.compile_only:
        state = dict(params=s_abs, opt_state=placed(opt_abs, opt_sh),
                     step=jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated))
        batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=batch_sh),
                             jax.eval_shape(make_batch, key_b))
        tparams = t_abs
    else:
        params = s_init(key_s)
        state = dict(params=params, opt_state=jax.jit(tx.init, out_shardings=opt_sh)(params),
                     step=jax.device_put(jnp.zeros((), jnp.int32), replicated))
        tparams = t_init(key_t)
        batch = make_batch(key_b)

    # Activations kept for the backward pass of one micro-batch (what remat / fused attention change).
    micro = jax.eval_shape(partial(batch_of, batch=a.batch // a.grad_accum, seq=a.seq, vocab=vocab), key_b)
    residual_bytes = saved_activation_bytes(
        lambda p, b, t: loss(p, b, t, {"tokens": 1.0})[0], s_abs, micro, t_abs)
    t0 = time.perf_counter()
    compiled = step_fn.lower(state, batch, tparams).compile()
    compile_s = time.perf_counter() - t0

    tokens = a.batch * a.seq
    n_s, n_t = s_cfg.num_params(), t_cfg.num_params()
    flops_tok = 6 * n_s + 2 * n_t
    attn_tok = 3 * attention_flops_per_token(s_cfg, a.seq) + attention_flops_per_token(t_cfg, a.seq)
    out = dict(bench="kd_step", impl="kdjax", student=a.student, teacher=a.teacher, batch=a.batch, seq=a.seq,
               chunk_size=a.chunk_size, remat=a.remat, remat_policy=a.remat_policy if a.remat else None,
               attention=a.attention, grad_accum=a.grad_accum, divergence=a.divergence,
               dtype=a.dtype, param_dtype=a.param_dtype, teacher_param_dtype=a.teacher_param_dtype,
               mesh=dict(mesh.shape), backend=jax.default_backend(), device=devices[0].device_kind,
               jax=jax.__version__, date=datetime.date.today().isoformat(),
               n_student=n_s, n_teacher=n_t, flops_per_token=flops_tok, attn_flops_per_token=attn_tok,
               peak_tflops=a.peak_tflops, compile_s=round(compile_s, 2),
               saved_activation_gib=round(residual_bytes / GIB, 4), **memory_analysis(compiled))

    if not a.compile_only:
        times, metrics = [], None
        for _ in range(a.warmup):
            state, metrics = compiled(state, batch, tparams)
            jax.block_until_ready((state, metrics))
        trace = (jax.profiler.trace(a.profile, create_perfetto_trace=True) if a.profile
                 else contextlib.nullcontext())
        with trace:
            for _ in range(a.steps):
                t0 = time.perf_counter()
                state, metrics = compiled(state, batch, tparams)
                jax.block_until_ready((state, metrics))
                times.append(time.perf_counter() - t0)
        dt = statistics.median(times)
        tflops = flops_tok * tokens / dt / 1e12
        attn_tflops = attn_tok * tokens / dt / 1e12
        out.update(step_s=round(dt, 6), step_s_min=round(min(times), 6), step_times=[round(t, 6) for t in times],
                   tokens_per_s=round(tokens / dt),
                   model_tflops=round(tflops, 1), mfu=round(tflops / a.peak_tflops, 4),
                   attn_tflops=round(attn_tflops, 1),
                   mfu_with_attn=round((tflops + attn_tflops) / a.peak_tflops, 4),
                   peak_gib=device_peak_gib(mesh.devices.flat), loss=float(metrics["loss"]),
                   grad_norm=float(metrics["grad_norm"]))
        if a.profile:
            out["profile"] = profile_summary(a.profile)
    if not quiet:
        print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
