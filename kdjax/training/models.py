"""The models a run trains and learns from: loading them on the mesh, students made of teacher
layers, and the forward pass every loss starts from (hidden states + output head)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from kdjax.checkpoint import load
from kdjax.errors import ConfigError
from kdjax.model import CausalLM


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
        raise ConfigError("student_layers", f"={spec!r}: expected 'every_other', 'first_last:N' with "
                                            f"0 < N <= {num_layers}, or a comma list of ints") from None
    bad = [i for i in layers if not 0 <= i < num_layers]
    if not layers or bad:
        raise ConfigError("student_layers", f"={spec!r}: indices must lie in [0, {num_layers}) (bad: {bad})")
    return layers


def student_from_teacher(teacher: CausalLM, layers: list[int], **config) -> CausalLM:
    """A student made of the given teacher layers (DistilBERT style): embeddings, norm, head and
    the chosen decoder layers are copied. `config`: ModelConfig fields that differ from the
    teacher's (param_dtype: the student's master weights when the teacher is kept in bf16)."""
    cfg = teacher.config.replace(num_layers=len(layers), **config)
    student = nnx.eval_shape(lambda: CausalLM(cfg))
    graphdef, state = nnx.split(student)
    src = nnx.to_pure_dict(nnx.state(teacher))
    dst = dict(src)
    dst["layers"] = {i: src["layers"][j] for i, j in enumerate(layers)}
    dtypes = nnx.to_pure_dict(state)
    # the student owns its buffers, in its own parameter dtype
    dst = jax.tree.map(lambda x, like: jnp.array(x, dtype=like.dtype, copy=True), dst, dtypes)
    nnx.replace_by_pure_dict(state, dst)
    return nnx.merge(graphdef, state)


def runtime_options(cfg) -> dict:
    """kdjax.load options of the trained model: compute and master dtypes, remat, attention."""
    return dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, remat=cfg.remat, remat_policy=cfg.remat_policy,
                attention=cfg.attention)


def load_frozen(src: str, cfg, mesh):
    """A model that gets no gradients (a teacher, GRPO's reference), in the compute dtype unless
    `teacher_param_dtype` says otherwise (a 3B teacher: 6.2 GB in bf16 instead of 12.3 GB fp32)."""
    kw = dict(runtime_options(cfg), param_dtype=cfg.teacher_param_dtype or cfg.dtype, remat=False)
    return load(src, mesh=mesh, **kw)


def load_trained(src: str, cfg, mesh):
    """(model, tokenizer) of a model to train, with fp32 (param_dtype) master weights."""
    return load(src, mesh=mesh, **runtime_options(cfg))


def load_student(cfg, teacher, tokenizer, mesh):
    """The KD student: the checkpoint `cfg.student`, or the teacher's `student_layers` (teacher None:
    only a checkpoint, whose vocabulary is then not checked against a teacher)."""
    if cfg.student:
        student, _ = load_trained(cfg.student, cfg, mesh)
    else:
        student = student_from_teacher(teacher, parse_layers(cfg.student_layers, teacher.config.num_layers),
                                       param_dtype=cfg.param_dtype, remat=cfg.remat)
    if teacher is not None:
        shared_vocab(student, teacher, tokenizer)
    return student


def shared_vocab(student, teacher, tokenizer) -> int:
    """The vocabulary both heads are cut to (padded embedding tables differ in size); a real
    mismatch (beyond the tokenizer's size) is an error."""
    sv, tv = student.config.vocab_size, teacher.config.vocab_size
    if tokenizer is not None and sv != tv and min(sv, tv) < len(tokenizer):
        raise ConfigError("student", f"teacher vocab {tv} and student vocab {sv} differ beyond padding (the "
                                     f"tokenizer has {len(tokenizer)} tokens): they must share a tokenizer")
    return min(sv, tv)


def hidden_and_head(graphdef, params, rows, *, packed: bool = False, layers: bool = False):
    """Final hidden states [B, T, D] and the output head [D, V] of the model on data rows (with
    `layers`: and the residual stream after each decoder layer, a list of [B, T, D]).

    Rows without packing hold one right-padded sequence each, so causal attention alone is exact
    for every real token (padding comes after them and carries no loss), and fused attention
    kernels run their causal mask, not a [B, T, T] bias. Packed rows attend inside their segment.
    """
    model = nnx.merge(graphdef, params)
    out = model.hidden_states(rows["input_ids"], positions=rows["positions"],
                              segment_ids=rows["segment_ids"] if packed else None, layers=layers)
    return (*out, model.head_kernel()) if layers else (out, model.head_kernel())
