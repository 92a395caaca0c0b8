"""The train state and one gradient update: the part of a step every trainer shares.

state = {"params": plain dict of arrays, "opt_state": AdamW's, "step": int32}, each sharded by the
parameters' logical axes (Adam's moments like their parameters; scalars replicated).

A trainer supplies only its loss:

    loss(params, micro_batch, frozen, totals) -> (loss, metrics)

where `totals` are the global normalisers of the whole batch (`totals(batch)`, e.g. its response
tokens) and every value the loss returns is a sum over the micro-batch divided by such a total,
so the micro-batches of gradient accumulation add up to the loss of the whole batch: with
`grad_accum = k` an update equals the update of one k-times larger batch.
"""
from __future__ import annotations

from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from kdjax.sharding import batch_spec, data_shards, make_mesh

Loss = Callable  # (params, micro_batch, frozen, totals) -> (loss, metrics)
Totals = Callable  # (batch) -> {name: scalar}


def make_optimizer(tc) -> optax.GradientTransformation:
    """AdamW with global-norm clipping, linear warm-up then cosine decay to lr * min_lr_ratio;
    no weight decay on vectors (norm scales, biases)."""
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=tc.lr, warmup_steps=tc.warmup_steps,
        decay_steps=max(tc.steps, tc.warmup_steps + 1), end_value=tc.lr * tc.min_lr_ratio)
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    return optax.chain(optax.clip_by_global_norm(tc.clip_norm),
                       optax.adamw(schedule, b1=tc.b1, b2=tc.b2, eps=tc.eps, weight_decay=tc.weight_decay,
                                   mask=decay_mask))


def batch_sharding(mesh) -> NamedSharding:
    """Rows of a batch split over the data-parallel axes (sharding.batch_spec: "data" and "fsdp")."""
    return NamedSharding(mesh, batch_spec())


def config_mesh(cfg, rows: int, what: str):
    """The mesh of cfg.mesh; `rows` (a micro-batch, `what` in the error) must split over its
    data * fsdp devices."""
    devices = jax.devices()[:cfg.mesh.num_devices] if cfg.mesh.num_devices else None
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices=devices)
    shards = data_shards(mesh)
    if rows % shards:
        raise ValueError(f"{what}, {rows} rows, does not split over the {shards} data*fsdp devices; change "
                         f"--config.train.batch_size or the mesh (--config.mesh.data/fsdp/tensor)")
    return mesh


def init_state(model, tx, mesh):
    """(graphdef, state, state shardings) of a model to train."""
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


def split_micro(batch, accum: int):
    """[B, ...] leaves -> [accum, B / accum, ...]: row r = m * accum + a goes to micro-batch a, so
    every micro-batch keeps the batch's sharding over the data-parallel devices."""
    return jax.tree.map(lambda x: x.reshape(-1, accum, *x.shape[1:]).swapaxes(0, 1), batch)


def update(state, batch, frozen, *, tx, loss: Loss, totals: Totals, accum: int = 1):
    """(state, batch, frozen params) -> (state, metrics): gradients of `loss` summed over `accum`
    micro-batches, one optimizer step. metrics: the loss's (summed over micro-batches), grad_norm
    and param_norm (inf/NaN there: the update broke the weights)."""
    params = state["params"]
    grad_fn = jax.value_and_grad(partial(loss, totals=totals(batch)), has_aux=True)

    def one(grads, micro):
        (value, metrics), g = grad_fn(params, micro, frozen)
        return jax.tree.map(jnp.add, grads, g), dict(metrics, loss=value)

    grads, metrics = jax.lax.scan(one, jax.tree.map(jnp.zeros_like, params), split_micro(batch, accum))
    metrics = jax.tree.map(jnp.sum, metrics)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    params = optax.apply_updates(params, updates)
    metrics["grad_norm"] = optax.global_norm(grads)
    metrics["param_norm"] = optax.global_norm(params)
    return dict(params=params, opt_state=opt_state, step=state["step"] + 1), metrics
