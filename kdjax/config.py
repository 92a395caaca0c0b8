"""Model configuration: one frozen dataclass for every family of kdjax/families.py (Qwen2 / Qwen2.5,
Llama-style SmolLM2, Qwen3).

Named presets give the published sizes; `from_hf` maps a transformers `config.json` of these
families onto it, and `to_hf` writes one back; what differs between families comes from their
`Family` record (`ModelConfig.family`).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import jax.numpy as jnp

from kdjax.families import FAMILIES, Family, dims, family_of_hf_config

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


ATTENTION_IMPLS = ("xla", "jax", "cudnn", "auto")
REMAT_POLICIES = ("nothing_saveable", "dots_with_no_batch_dims_saveable", "dots_saveable", "everything_saveable")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    qkv_bias: bool = True
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 32768
    architecture: str = "qwen2"  # the family (kdjax.families.FAMILIES): "qwen2", "llama" or "qwen3"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    dtype: str = "float32"  # activations / compute
    param_dtype: str = "float32"  # stored parameters (fp32 master weights)
    remat: bool = False  # rematerialise each decoder layer in the backward pass
    # what remat keeps: a jax.checkpoint_policies name; "nothing_saveable" recomputes the whole layer,
    # "dots_with_no_batch_dims_saveable" keeps the projections' outputs and recomputes attention
    remat_policy: str = "nothing_saveable"
    # "xla" (einsums, any backend), "cudnn" (fused, GPU), "jax" (jax.nn's XLA path), "auto" (cudnn on a
    # GPU in bf16/fp16 for unmasked causal attention, else xla): kdjax.model.attend
    attention: str = "xla"

    def __post_init__(self):
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r}: expected one of {sorted(_DTYPES)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig: num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(f"ModelConfig.attention={self.attention!r}: expected one of {ATTENTION_IMPLS}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"ModelConfig.remat_policy={self.remat_policy!r}: expected one of {REMAT_POLICIES}")
        if self.architecture not in FAMILIES:
            raise ValueError(f"ModelConfig.architecture={self.architecture!r}: expected one of {sorted(FAMILIES)}")

    @property
    def family(self) -> Family:
        return FAMILIES[self.architecture]

    @property
    def compute_dtype(self):
        return _DTYPES[self.dtype]

    @property
    def weight_dtype(self):
        return _DTYPES[self.param_dtype]

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    def num_params(self) -> int:
        """Parameters of the model: the family's tensors (kdjax.families.TENSORS) counted by shape."""
        size = dims(vocab=self.vocab_size, hidden=self.hidden_size, ffn=self.intermediate_size,
                    heads=self.num_heads, kv_heads=self.num_kv_heads, head_dim=self.head_dim)
        total = 0
        for t in self.family.tensors(bias=self.qkv_bias, tied=self.tie_word_embeddings):
            n = math.prod(size[d] for d in t.shape)
            total += n * (self.num_layers if "{i}" in t.kdjax else 1)
        return total

    # ---- presets -------------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
        return dataclasses.replace(PRESETS[name], **overrides)

    # ---- transformers config.json -------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json", **overrides) -> "ModelConfig":
        """Maps a transformers config dict of a kdjax family (kdjax.families) onto ModelConfig."""
        family = family_of_hf_config(hf, source)

        def need(key):
            if key not in hf:
                raise ValueError(f"{source}: missing field {key!r}")
            return hf[key]

        rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in (None, "default"):
            raise ValueError(f"{source}: rope_scaling type {rope_type!r} is not supported (only the default RoPE)")
        theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
        if hf.get("use_sliding_window"):
            raise ValueError(f"{source}: use_sliding_window=true is not supported")
        if hf.get("mlp_bias"):
            raise ValueError(f"{source}: mlp_bias=true is not supported")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{source}: hidden_act={hf['hidden_act']!r} is not supported (only silu)")
        heads = need("num_attention_heads")
        hidden = need("hidden_size")
        qkv_bias = True if family.qkv_bias_only else bool(hf.get("attention_bias", False))
        cfg = dict(
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_layers=need("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hidden // heads,
            rope_theta=float(theta),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            qkv_bias=qkv_bias,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),  # transformers' default
            max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
            architecture=family.name,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
        )
        cfg.update(overrides)
        return cls(**cfg)

    def to_hf(self, torch_dtype: str = "float32") -> dict[str, Any]:
        family = self.family
        hf = {
            "architectures": [family.hf_architecture],
            "model_type": family.name,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "torch_dtype": torch_dtype,
            "dtype": torch_dtype,
            **dict(family.hf_fields),
        }
        if not family.qkv_bias_only:
            hf["attention_bias"] = self.qkv_bias
        elif not self.qkv_bias:
            raise ValueError(f"a {family.name} model always has q/k/v bias; use architecture='llama' for none")
        if self.bos_token_id is not None:
            hf["bos_token_id"] = self.bos_token_id
        if self.eos_token_id is not None:
            hf["eos_token_id"] = self.eos_token_id
        return hf


def load_hf_config(path: str, **overrides) -> ModelConfig:
    """Reads `config.json` from an HF directory (or the file itself)."""
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    try:
        with open(file) as f:
            hf = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{file}: no config.json (an HF model directory needs one)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: line {e.lineno}: not valid JSON ({e.msg})") from None
    return ModelConfig.from_hf(hf, source=file, **overrides)


def _qwen25(hidden, inter, layers, heads, kv, tie, vocab=151936):
    return ModelConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_layers=layers,
                       num_heads=heads, num_kv_heads=kv, head_dim=hidden // heads, rope_theta=1_000_000.0,
                       rms_norm_eps=1e-6, qkv_bias=True, tie_word_embeddings=tie,
                       max_position_embeddings=32768, architecture="qwen2",
                       bos_token_id=151643, eos_token_id=151645)


def _qwen3(hidden, inter, layers, heads, kv):
    # The published Qwen/Qwen3-{0.6B,1.7B,4B}/config.json (huggingface.co/Qwen/Qwen3-0.6B/raw/main/config.json):
    # head_dim 128 in every size (0.6B, 4B: not hidden / heads), no attention bias, tied embeddings up to 4B.
    return ModelConfig(vocab_size=151936, hidden_size=hidden, intermediate_size=inter, num_layers=layers,
                       num_heads=heads, num_kv_heads=kv, head_dim=128, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                       qkv_bias=False, tie_word_embeddings=True, max_position_embeddings=40960,
                       architecture="qwen3", bos_token_id=151643, eos_token_id=151645)


PRESETS: dict[str, ModelConfig] = {
    "qwen2.5-0.5b": _qwen25(896, 4864, 24, 14, 2, True),
    "qwen2.5-1.5b": _qwen25(1536, 8960, 28, 12, 2, True),
    "qwen2.5-3b": _qwen25(2048, 11008, 36, 16, 2, True),
    "qwen2.5-7b": _qwen25(3584, 18944, 28, 28, 4, False, vocab=152064),
    "smollm2-135m": ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                                num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=100000.0,
                                rms_norm_eps=1e-5, qkv_bias=False, tie_word_embeddings=True,
                                max_position_embeddings=8192, architecture="llama",
                                bos_token_id=1, eos_token_id=2),
    "qwen3-0.6b": _qwen3(1024, 3072, 28, 16, 8),
    "qwen3-1.7b": _qwen3(2048, 6144, 28, 16, 8),
    "qwen3-4b": _qwen3(2560, 9728, 36, 32, 8),
    # Tiny sizes for tests: every family, tied and untied.
    "tiny-qwen2": ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                              num_kv_heads=2, head_dim=16, rope_theta=10000.0, qkv_bias=True,
                              tie_word_embeddings=True, max_position_embeddings=256, architecture="qwen2"),
    "tiny-llama": ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                              num_kv_heads=1, head_dim=16, rope_theta=10000.0, rms_norm_eps=1e-5,
                              qkv_bias=False, tie_word_embeddings=False, max_position_embeddings=256,
                              architecture="llama"),
    # head_dim 32 != hidden_size / num_heads = 16, as in the real Qwen3 sizes
    "tiny-qwen3": ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                              num_kv_heads=2, head_dim=32, rope_theta=10000.0, qkv_bias=False,
                              tie_word_embeddings=True, max_position_embeddings=256, architecture="qwen3"),
}
