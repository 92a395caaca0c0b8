"""Benchmark: kdjax decoding throughput (kdjax.generate.decode), as the anchor ../shared/bench/torch_generate.py.

A Qwen2.5-0.5B-config model with random weights (bf16, built on the device by a jitted init),
`--batch` random prompts of `--prompt` tokens, `--new` sampled tokens each (temperature 1,
top-p 1 as the anchor; no stop token, so every row generates all `--new` tokens, as the anchor's
min_new_tokens does). The timed call includes the prefill, as HF `generate` does.

Measures: compile time, `--warmup` untimed calls, then `--repeats` timed calls (median). `--compile_only`
compiles on abstract inputs (nothing allocated) and reports compile time and XLA's memory analysis. One JSON line:
  gen_tokens_per_s   batch * new / seconds of one generate call
  model_tflops       2 N (batch * (prompt + new)) / seconds (attention ignored): a rough rate only;
                     decoding is bound by memory bandwidth, not FLOPs
  peak_gib           device.memory_stats()["peak_bytes_in_use"] (null on CPU), and XLA's compiled
                     memory analysis (xla_*_gib)

  python bench/generate.py                                  # batch 256, 256 + 512 tokens
  python bench/generate.py --batch=64                       # the anchor's smaller batch
  python bench/generate.py --model=tiny-qwen2 --batch=2 --prompt=8 --new=8
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from bench.kd_step import memory_analysis  # noqa: E402
from kdjax.config import ATTENTION_IMPLS, ModelConfig  # noqa: E402
from kdjax.generate import decode  # noqa: E402
from kdjax.model import Qwen2  # noqa: E402

GIB = 2 ** 30


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2.5-0.5b", help="ModelConfig preset")
    ap.add_argument("--batch", type=int, default=256, help="prompts decoded together")
    ap.add_argument("--prompt", type=int, default=256, help="tokens a prompt")
    ap.add_argument("--new", type=int, default=512, help="generated tokens a row")
    ap.add_argument("--dtype", default="bfloat16", help="compute dtype")
    ap.add_argument("--attention", default="xla", choices=ATTENTION_IMPLS,
                    help="kdjax.config attention (cudnn: fused attention, GPU only; masked decode steps pass "
                    "cuDNN a bias)")
    ap.add_argument("--param_dtype", default="bfloat16", help="weights (bf16 as the anchor)")
    ap.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    ap.add_argument("--top_k", type=int, default=0)
    ap.add_argument("--top_p", type=float, default=1.0)
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls after compilation")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls (median reported)")
    ap.add_argument("--peak_tflops", type=float, default=989.0, help="for the rough MFU figure")
    ap.add_argument("--compile_only", action="store_true",
                    help="compile on abstract inputs and report compile time and memory analysis only")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if min(a.batch, a.prompt, a.new, a.repeats) < 1 or a.warmup < 0:
        ap.error("--batch, --prompt, --new, --repeats must be >= 1 and --warmup >= 0")
    return a


def device_peak_gib(device):
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - CPU backends may raise or return None
        stats = None
    return round(stats["peak_bytes_in_use"] / GIB, 3) if stats and "peak_bytes_in_use" in stats else None


def measure(a, cfg, compiled, args) -> dict:
    """Times `compiled(*args)`: generated tokens/s and the rough FLOP rate."""
    times = []
    for i in range(a.warmup + a.repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(compiled(*args))
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
    dt = statistics.median(times)
    out = np.asarray(out)
    if out.shape != (a.batch, a.new):
        raise RuntimeError(f"decode returned {out.shape}, expected {(a.batch, a.new)}")
    generated = out.size
    n = cfg.num_params()
    tflops = 2 * n * a.batch * (a.prompt + a.new) / dt / 1e12
    return dict(s=round(dt, 6), s_min=round(min(times), 6), gen_tokens_per_s=round(generated / dt),
                model_tflops=round(tflops, 2), mfu=round(tflops / a.peak_tflops, 4),
                peak_gib=device_peak_gib(jax.devices()[0]))



def main(argv=None):
    a = parse_args(argv)
    cfg = ModelConfig.preset(a.model, dtype=a.dtype, param_dtype=a.param_dtype, attention=a.attention)
    if a.prompt + a.new > cfg.max_position_embeddings:
        raise SystemExit(f"--prompt={a.prompt} + --new={a.new} exceeds the context of {a.model} "
                         f"({cfg.max_position_embeddings} tokens)")
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Qwen2(cfg)))
    key_w, key_p, key_s = jax.random.split(jax.random.key(a.seed), 3)
    if a.compile_only:
        state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), abstract)
        ids = mask = jax.ShapeDtypeStruct((a.batch, a.prompt), jnp.int32)
    else:
        state = jax.jit(lambda k: nnx.state(Qwen2(cfg, rngs=nnx.Rngs(params=k))))(key_w)
        ids = jax.random.randint(key_p, (a.batch, a.prompt), 0, cfg.vocab_size, jnp.int32)
        mask = jnp.ones((a.batch, a.prompt), jnp.int32)
    stop = jnp.asarray([-1], jnp.int32)  # no token id is -1: every row runs to --new tokens
    args = ((state,), ids, mask, key_s, stop, jnp.int32(0), jnp.float32(0.0))
    static = dict(max_new_tokens=a.new, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p)

    t0 = time.perf_counter()
    compiled = decode.lower(*args, graphdefs=(graphdef,), **static).compile()
    compile_s = time.perf_counter() - t0
    res = dict(bench="generate", impl="kdjax", model=a.model, batch=a.batch, prompt=a.prompt, new=a.new,
               dtype=a.dtype, param_dtype=a.param_dtype, attention=a.attention, temperature=a.temperature,
               top_k=a.top_k, top_p=a.top_p,
               backend=jax.default_backend(), device=jax.devices()[0].device_kind, jax=jax.__version__,
               date=datetime.date.today().isoformat(), compile_s=round(compile_s, 2), **memory_analysis(compiled))
    if not a.compile_only:
        res.update(measure(a, cfg, compiled, args))
    print(json.dumps(res), flush=True)
    return res


if __name__ == "__main__":
    main()
