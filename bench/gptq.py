"""Benchmark: sequential GPTQ of a whole model (kdjax.quant.quantize.quantize_model) beside its floor.

The floor, measured in the same call on the same model and calibration tokens: what any sequential
GPTQ computes besides bookkeeping, each part timed alone:
  forward_s   one float32 forward of the decoder over the calibration rows (jitted, in the same
              batches; after its compilation): every pass of a layer together must compute at least this
  hessian_s   X^T X of every linear set's input (kdjax.quant.gptq.hessian_update on inputs of the
              set's width, as many tokens; one batch timed, times the count)
  solver_s    kdjax.quant.gptq.gptq_layer on every linear, with a Hessian of the right size
              (its compilations included; quantize_model, timed after, reuses them and pays only
              its layer passes' compilations)
ratio = gptq_s / (forward_s + hessian_s + solver_s): 1 means nothing beyond the floor is spent
(docs/benchmarks.md has it measured). One JSON line.

  python bench/gptq.py                         # SmolLM2-135M-Instruct (from pip), 128 x 256 stdlib tokens
  python bench/gptq.py --model=tiny-qwen2 --rows=4 --length=16 --group_size=32   # random weights
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from kdjax.config import ModelConfig  # noqa: E402
from kdjax.quant.gptq import gptq_layer, hessian_finalize, hessian_init, hessian_update  # noqa: E402
from kdjax.quant.quantize import get_linear, model_linear_paths, quantize_model  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct",
                    help="a model kdjax loads (weights and the stdlib calibration rows), or a ModelConfig "
                    "preset without weights (random weights and token ids)")
    ap.add_argument("--rows", type=int, default=128, help="calibration rows")
    ap.add_argument("--length", type=int, default=256, help="tokens a calibration row")
    ap.add_argument("--batch", type=int, default=16, help="rows a calibration batch")
    ap.add_argument("--group_size", type=int, default=64)
    ap.add_argument("--mse", type=float, default=2.4, help="range search norm (0: off)")
    ap.add_argument("--no-desc_act", dest="desc_act", action="store_false", help="without act-order")
    a = ap.parse_args(argv)
    if min(a.rows, a.length, a.batch) < 1:
        ap.error("--rows, --length and --batch must be >= 1")
    return a


def model_and_tokens(a):
    """(float32 model, calibration ids [rows, length]): a ModelConfig preset has random weights and
    token ids; anything else is loaded by kdjax and calibrated on the default job's stdlib pairs."""
    from kdjax.config import PRESETS
    if a.model in PRESETS:
        from kdjax.model import Qwen2
        cfg = ModelConfig.preset(a.model, dtype="float32", param_dtype="float32")
        ids = jax.random.randint(jax.random.key(0), (a.rows, a.length), 0, cfg.vocab_size)
        return Qwen2(cfg, seed=0), np.asarray(ids, np.int32)
    from kdjax import checkpoint, data
    from kdjax.quant.calibration import calibration_ids
    from kdjax.train_config import get_config
    cfg = get_config()
    model, tokenizer = checkpoint.load(a.model, dtype="float32")
    records = data.python_function_records(limit=cfg.data.stdlib_pairs)
    return model, calibration_ids(records, tokenizer, num_rows=a.rows, length=a.length, template=cfg.data.template)


def seconds(fn, args_list) -> float:
    """Seconds of fn over args_list, after one untimed call on its first entry (compilation)."""
    jax.block_until_ready(fn(*args_list[0]))
    t0 = time.perf_counter()
    for args in args_list:
        jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0


def floor(a, model, ids) -> dict:
    batches = [(jnp.asarray(ids[s:s + a.batch]),) for s in range(0, len(ids), a.batch)]
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, x: nnx.merge(graphdef, state).hidden_states(x))
    forward_s = seconds(lambda x: forward(state, x), batches)
    widths = {}  # input width of a linear set -> how many sets have it
    for layer in model.layers:
        for mod, names in model.config.family.linear_sets:
            n_in = getattr(getattr(layer, mod), names[0]).kernel.shape[0]
            widths[n_in] = widths.get(n_in, 0) + 1
    hessian_s = 0.0
    for n_in, count in widths.items():  # one batch of one set timed, times sets x batches
        x = jax.random.normal(jax.random.key(1), (batches[0][0].shape[0], a.length, n_in), jnp.float32)
        hessian_s += count * len(batches) * seconds(lambda x: hessian_update(hessian_init(n_in), x), [(x,)])
    solver_s = 0.0  # every linear once, its compilations included
    hessians = {n: hessian_finalize(hessian_update(hessian_init(n), jax.random.normal(jax.random.key(2), (4 * n, n))))
                for n in widths}
    for path in model_linear_paths(model):
        kernel = get_linear(model, path).kernel[...]
        t0 = time.perf_counter()
        jax.block_until_ready(gptq_layer(kernel, hessians[kernel.shape[0]], group_size=a.group_size,
                                         desc_act=a.desc_act, mse=a.mse).codes)
        solver_s += time.perf_counter() - t0
    return dict(forward_s=round(forward_s, 2), hessian_s=round(hessian_s, 2), solver_s=round(solver_s, 2))


def main(argv=None):
    a = parse_args(argv)
    model, ids = model_and_tokens(a)
    parts = floor(a, model, ids)  # first: it pays the solver's compilations, which quantize_model then reuses
    t0 = time.perf_counter()
    qm = quantize_model(model, ids, method="gptq", group_size=a.group_size, desc_act=a.desc_act,
                        batch_size=a.batch, mse=a.mse)
    gptq_s = time.perf_counter() - t0
    res = dict(bench="gptq", impl="kdjax", model=a.model, rows=int(ids.shape[0]), length=int(ids.shape[1]),
               batch=a.batch, group_size=a.group_size, desc_act=a.desc_act, mse=a.mse, linears=len(qm.linears),
               backend=jax.default_backend(), device=jax.devices()[0].device_kind, jax=jax.__version__,
               date=datetime.date.today().isoformat(), gptq_s=round(gptq_s, 2), **parts)
    res["floor_s"] = round(res["forward_s"] + res["hessian_s"] + res["solver_s"], 2)
    res["ratio"] = round(gptq_s / res["floor_s"], 3)
    print(json.dumps(res), flush=True)
    return res


if __name__ == "__main__":
    main()
