"""Model families: what kdjax knows about each architecture, one record per family.

Every family is the same dense decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU MLP;
kdjax/model.py). What tells them apart is listed in `Family`: the transformers names
(`architectures`, `model_type`), which projections carry a bias, whether q and k are RMS-normed
per head, fixed config.json fields, how llama.cpp stored the weights, and which linears int4
quantization touches.

Every parameter has three names: its kdjax path (`layers.3.self_attn.q_proj.kernel`), its
transformers state-dict name (`model.layers.3.self_attn.q_proj.weight`) and its GGUF name
(`blk.3.attn_q.weight`). `TENSORS` lists each parameter once with all three, its torch shape in
named dimensions and when a model holds it; the HF and GGUF names in both directions are lookups
in that one table.

Adding a family is one `Family(...)` in `FAMILIES`, rows in `TENSORS` for a tensor no family had
before, and the optional piece in kdjax/model.py. Qwen3 was added that way (q_norm, k_norm).
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any

# Linears of a decoder layer in call order, in sets that see the same input: what int4
# quantization (kdjax.quant) replaces, set by set (GPTQ's true-sequential order).
DECODER_LINEAR_SETS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("self_attn", ("q_proj", "k_proj", "v_proj")),
    ("self_attn", ("o_proj",)),
    ("mlp", ("gate_proj", "up_proj")),
    ("mlp", ("down_proj",)),
)


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One parameter under its three names; `{i}` stands for the layer index."""

    kdjax: str  # path in the Flax model
    hf: str  # transformers state-dict name
    gguf: str  # llama.cpp name
    shape: tuple[str, ...]  # torch layout ([out, in] for kernels) in the named dims of `dims()`
    when: str = "always"  # present "always", or only with "qkv_bias", "o_bias", "qk_norm", "untied"
    rope: str | None = None  # "heads"/"kv_heads": rows llama.cpp permutes in `rope_permuted` families

    @property
    def transpose(self) -> bool:
        """kdjax kernels are [in, out]; torch weights [out, in]."""
        return self.kdjax.endswith(".kernel")


def _layer(kdjax: str, hf: str, gguf: str, shape, **kw) -> Tensor:
    return Tensor(f"layers.{{i}}.{kdjax}", f"model.layers.{{i}}.{hf}", f"blk.{{i}}.{gguf}", shape, **kw)


TENSORS: tuple[Tensor, ...] = (
    Tensor("embed_tokens.embedding", "model.embed_tokens.weight", "token_embd.weight", ("vocab", "hidden")),
    _layer("input_layernorm.scale", "input_layernorm.weight", "attn_norm.weight", ("hidden",)),
    _layer("self_attn.q_proj.kernel", "self_attn.q_proj.weight", "attn_q.weight", ("q", "hidden"), rope="heads"),
    _layer("self_attn.q_proj.bias", "self_attn.q_proj.bias", "attn_q.bias", ("q",), when="qkv_bias", rope="heads"),
    _layer("self_attn.k_proj.kernel", "self_attn.k_proj.weight", "attn_k.weight", ("kv", "hidden"),
           rope="kv_heads"),
    _layer("self_attn.k_proj.bias", "self_attn.k_proj.bias", "attn_k.bias", ("kv",), when="qkv_bias",
           rope="kv_heads"),
    _layer("self_attn.v_proj.kernel", "self_attn.v_proj.weight", "attn_v.weight", ("kv", "hidden")),
    _layer("self_attn.v_proj.bias", "self_attn.v_proj.bias", "attn_v.bias", ("kv",), when="qkv_bias"),
    _layer("self_attn.q_norm.scale", "self_attn.q_norm.weight", "attn_q_norm.weight", ("head_dim",),
           when="qk_norm"),
    _layer("self_attn.k_norm.scale", "self_attn.k_norm.weight", "attn_k_norm.weight", ("head_dim",),
           when="qk_norm"),
    _layer("self_attn.o_proj.kernel", "self_attn.o_proj.weight", "attn_output.weight", ("hidden", "q")),
    _layer("self_attn.o_proj.bias", "self_attn.o_proj.bias", "attn_output.bias", ("hidden",), when="o_bias"),
    _layer("post_attention_layernorm.scale", "post_attention_layernorm.weight", "ffn_norm.weight", ("hidden",)),
    _layer("mlp.gate_proj.kernel", "mlp.gate_proj.weight", "ffn_gate.weight", ("ffn", "hidden")),
    _layer("mlp.up_proj.kernel", "mlp.up_proj.weight", "ffn_up.weight", ("ffn", "hidden")),
    _layer("mlp.down_proj.kernel", "mlp.down_proj.weight", "ffn_down.weight", ("hidden", "ffn")),
    Tensor("norm.scale", "model.norm.weight", "output_norm.weight", ("hidden",)),
    Tensor("lm_head.kernel", "lm_head.weight", "output.weight", ("vocab", "hidden"), when="untied"),
)


def dims(*, vocab: int, hidden: int, ffn: int, heads: int, kv_heads: int, head_dim: int) -> dict[str, int]:
    """The sizes behind the named dims of `Tensor.shape`."""
    return {"vocab": vocab, "hidden": hidden, "ffn": ffn, "q": heads * head_dim, "kv": kv_heads * head_dim,
            "head_dim": head_dim}


_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def _template(name: str) -> tuple[str, str | None]:
    """"model.layers.3.mlp.up_proj.weight" -> ("model.layers.{i}.mlp.up_proj.weight", "3")."""
    m = _LAYER_INDEX.search(name)
    if m is None:
        return name, None
    return f"{name[:m.start()]}.{{i}}.{name[m.end():]}", m.group(1)


@dataclasses.dataclass(frozen=True)
class Family:
    """One architecture. `name` is config.json's `model_type`, `ModelConfig.architecture` and
    GGUF's `general.architecture` at once."""

    name: str
    hf_architecture: str  # config.json `architectures`: the transformers class
    # True: q/k/v always carry a bias, o_proj none, and config.json has no switch (Qwen2).
    # False: config.json's `attention_bias` (default false) biases q, k, v and o_proj (Llama, Qwen3).
    qkv_bias_only: bool
    qk_norm: bool = False  # RMSNorm over head_dim on every q and k head, before RoPE (Qwen3)
    hf_fields: tuple[tuple[str, Any], ...] = ()  # fixed config.json fields (features kdjax leaves off)
    rope_permuted: bool = False  # GGUF: llama.cpp permuted q/k rows for GGML's interleaved RoPE
    linear_sets: tuple[tuple[str, tuple[str, ...]], ...] = DECODER_LINEAR_SETS  # what int4 touches

    def has(self, when: str, *, bias: bool, tied: bool) -> bool:
        """Whether a model of this family with q/k/v bias `bias` and tied embeddings `tied` holds the
        tensors marked `when`."""
        return {"always": True, "qkv_bias": bias, "o_bias": bias and not self.qkv_bias_only,
                "qk_norm": self.qk_norm, "untied": not tied}[when]

    def tensors(self, *, bias: bool, tied: bool) -> list[Tensor]:
        """The tensors of such a model, in HF order (templates: `{i}` = layer index)."""
        return [t for t in TENSORS if self.has(t.when, bias=bias, tied=tied)]

    @functools.cached_property
    def _by_hf(self) -> dict[str, Tensor]:  # every tensor the family can hold
        return {t.hf: t for t in self.tensors(bias=True, tied=False)}

    @functools.cached_property
    def _by_kdjax(self) -> dict[str, Tensor]:
        return {t.kdjax: t for t in self._by_hf.values()}

    def kdjax_name(self, hf_name: str) -> tuple[str, bool] | None:
        """transformers name -> (kdjax path, transpose), or None for a name the family lacks."""
        key, i = _template(hf_name)
        t = self._by_hf.get(key)
        return None if t is None else (t.kdjax.format(i=i), t.transpose)

    def hf_name(self, path: str) -> tuple[str, bool]:
        """kdjax path -> (transformers name, transpose)."""
        key, i = _template(path)
        if key not in self._by_kdjax:
            raise KeyError(f"no HF name for kdjax parameter {path!r} in the {self.name} family")
        t = self._by_kdjax[key]
        return t.hf.format(i=i), t.transpose

    def hf_module(self, linear: str) -> str:
        """kdjax linear path "layers.3.mlp.down_proj" -> transformers module "model.layers.3.mlp.down_proj"."""
        return self.hf_name(linear + ".kernel")[0].removesuffix(".weight")

    def linear_of_hf_module(self, module: str) -> str | None:
        """The inverse of `hf_module`; None for a module that is no linear of this family."""
        hit = self.kdjax_name(module + ".weight")
        return None if hit is None or not hit[0].endswith(".kernel") else hit[0].removesuffix(".kernel")


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("qwen2", "Qwen2ForCausalLM", qkv_bias_only=True, hf_fields=(("use_sliding_window", False),)),
    Family("llama", "LlamaForCausalLM", qkv_bias_only=False, hf_fields=(("mlp_bias", False),),
           rope_permuted=True),
    # transformers' Qwen3Attention: q_norm/k_norm on each head before RoPE, Llama's attention_bias switch
    Family("qwen3", "Qwen3ForCausalLM", qkv_bias_only=False, qk_norm=True,
           hf_fields=(("use_sliding_window", False),)),
)}


def family_of_hf_config(hf: dict[str, Any], source: str = "config.json") -> Family:
    """The family of a transformers config dict, by `architectures`, else by `model_type`."""
    archs = hf.get("architectures") or []
    by_class = {f.hf_architecture: f for f in FAMILIES.values()}
    found = next((by_class[a] for a in archs if a in by_class), None) or FAMILIES.get(hf.get("model_type"))
    if found is None:
        raise ValueError(
            f"{source}: unsupported architecture {archs or hf.get('model_type')!r}; kdjax supports "
            f"{', '.join(by_class)} (model_type {' / '.join(FAMILIES)})")
    return found
