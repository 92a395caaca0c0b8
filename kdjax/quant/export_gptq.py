"""Export to a GPTQ checkpoint that transformers (+ optimum + gptqmodel) loads, and read one back.

Layout (one `model.safetensors` + `config.json` + `quantize_config.json`):
- per quantized linear, under its HF name: `{name}.qweight` int32 [in/8, out], `{name}.qzeros`
  int32 [G, out/8] (v1: zero - 1), `{name}.scales` fp16 [G, out], `{name}.g_idx` int32 [in]
  (see grid.py), and `{name}.bias` when the layer has one;
- every other tensor (embeddings, norms, lm_head) in `dtype` (float16 by default, GPTQ's usual);
- config.json: the model's transformers config plus `quantization_config`
  {quant_method: "gptq", bits, group_size, desc_act, sym, checkpoint_format: "gptq", ...}.
"""
from __future__ import annotations

import json
import os
from typing import Iterable

import numpy as np

from kdjax.families import family_of_hf_config
from kdjax.quant.grid import pack, unpack
from kdjax.quant.quantize import QuantizedModel

_DTYPES = {"float16": np.float16, "bfloat16": None, "float32": np.float32}


def gptq_quantization_config(qm: QuantizedModel) -> dict:
    """The `quantization_config` block (also written alone as quantize_config.json)."""
    return {
        "quant_method": "gptq",
        "bits": qm.bits,
        "group_size": qm.group_size,
        "desc_act": qm.desc_act,
        "sym": qm.sym,
        "static_groups": qm.static_groups,
        "true_sequential": True,
        "damp_percent": qm.percdamp,
        "mse": qm.mse,
        "lm_head": False,
        "checkpoint_format": "gptq",
        "format": "gptq",
        "pack_dtype": "int32",
        "meta": {"quantizer": ["kdjax:0.1.0"], "kdjax_method": qm.method},
    }


def _np_dtype(dtype: str):
    if dtype == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    if dtype not in _DTYPES:
        raise ValueError(f"export_gptq: dtype={dtype!r}; expected one of {sorted(_DTYPES)}")
    return np.dtype(_DTYPES[dtype])


def export_gptq(dst: str, tensors: Iterable[tuple[str, np.ndarray]], qm: QuantizedModel, hf_config: dict,
                *, dtype: str = "float16") -> str:
    """Writes the GPTQ checkpoint to directory `dst`.

    tensors: (HF name, array in torch layout) for the whole unquantized model, e.g.
    `kdjax.checkpoint.hf_state_dict(model)`; the `.weight` of every quantized linear is skipped.
    hf_config: the model's transformers config.json dict (ModelConfig.to_hf()).
    """
    from kdjax.checkpoint import write_safetensors

    np_dtype = _np_dtype(dtype)
    family = family_of_hf_config(hf_config, "export_gptq: hf_config")
    modules = {p: family.hf_module(p) for p in qm.linears}  # kdjax linear path -> HF module name
    quantized = {m + ".weight" for m in modules.values()}
    kept, seen = [], set()
    for name, arr in tensors:
        seen.add(name)
        if name not in quantized:
            kept.append((name, np.ascontiguousarray(np.asarray(arr).astype(np_dtype))))
    missing = sorted(quantized - seen)
    if missing:
        raise ValueError(f"export_gptq: the tensors lack {missing[:3]} ({len(missing)} quantized layers in all); "
                         "the QuantizedModel and the model do not match")
    packed = []
    for path, q in qm.linears.items():
        for suffix, arr in pack(q).items():
            packed.append((f"{modules[path]}.{suffix}", arr))
    everything = kept + packed
    shapes = {name: (arr.shape, arr.dtype) for name, arr in everything}
    os.makedirs(dst, exist_ok=True)
    write_safetensors(os.path.join(dst, "model.safetensors"), everything, shapes, metadata={"format": "pt"})
    qcfg = gptq_quantization_config(qm)
    config = dict(hf_config, torch_dtype=dtype, dtype=dtype, quantization_config=qcfg)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(dst, "quantize_config.json"), "w") as f:
        json.dump(qcfg, f, indent=2)
    return dst


def save_gptq(model, qm: QuantizedModel, dst: str, *, tokenizer=None, dtype: str = "float16") -> str:
    """`export_gptq` for a kdjax model: its HF state dict and config, plus the tokenizer if given."""
    from kdjax.checkpoint import hf_state_dict

    export_gptq(dst, hf_state_dict(model), qm, model.config.to_hf(dtype), dtype=dtype)
    if tokenizer is not None:
        tokenizer.save_pretrained(dst)
    return dst


_PACKED = (".qweight", ".qzeros", ".scales", ".g_idx")


def is_gptq_dir(path: str) -> bool:
    """True when `path` is a directory whose config.json says quant_method "gptq"."""
    try:
        with open(os.path.join(path, "config.json")) as f:
            qc = json.load(f).get("quantization_config") or {}
    except (OSError, ValueError):
        return False
    return qc.get("quant_method") == "gptq"


def read_gptq(path: str):
    """Reads a GPTQ (v1) checkpoint directory (ours or another tool's, single safetensors file or
    sharded) -> (ModelConfig, QuantizedModel, float tensors), where the float tensors are (HF name,
    array) with every quantized linear's `.weight` dequantized in float32 (torch layout)."""
    from kdjax.checkpoint import hf_tensor_files, read_safetensors
    from kdjax.config import load_hf_config

    conf_file = os.path.join(path, "config.json")
    with open(conf_file) as f:
        qc = json.load(f).get("quantization_config") or {}
    if qc.get("quant_method") != "gptq":
        raise ValueError(f"{conf_file}: quantization_config.quant_method is {qc.get('quant_method')!r}, not 'gptq'")
    fmt = qc.get("checkpoint_format", qc.get("format", "gptq"))
    if fmt != "gptq":
        raise ValueError(f"{conf_file}: checkpoint_format {fmt!r}; only GPTQ v1 ('gptq') is read")
    cfg = load_hf_config(path)
    bits, gs, sym = int(qc.get("bits", 4)), int(qc.get("group_size", 128)), bool(qc.get("sym", True))
    packed, plain = {}, []
    for file in sorted(set(hf_tensor_files(path).values())):
        for name, arr in read_safetensors(file):
            suffix = next((s for s in _PACKED if name.endswith(s)), None)
            if suffix is None:
                plain.append((name, np.asarray(arr)))
            else:
                packed.setdefault(name[: -len(suffix)], {})[suffix[1:]] = np.asarray(arr)
    linears = {}
    for module, t in packed.items():
        linear = cfg.family.linear_of_hf_module(module)
        if set(t) != {s[1:] for s in _PACKED} or linear is None:
            raise ValueError(f"{path}: GPTQ module {module!r} has tensors {sorted(t)}; expected {list(_PACKED)} "
                             f"of a linear of a {cfg.architecture} model")
        linears[linear] = unpack(t, bits=bits, group_size=gs, sym=sym)
    qm = QuantizedModel(linears, qc.get("meta", {}).get("kdjax_method", "gptq"), bits, gs, sym,
                        bool(qc.get("desc_act", False)), bool(qc.get("static_groups", False)),
                        float(qc.get("damp_percent", 0.01)), mse=float(qc.get("mse", 0.0)))
    deq = [(cfg.family.hf_module(p) + ".weight", q.dequantize().T) for p, q in linears.items()]
    return cfg, qm, plain + deq


def load_gptq(path: str, *, dtype=None):
    """A GPTQ checkpoint directory -> (int4 kdjax model with AQT `Int4Linear` layers, QuantizedModel).

    dtype: compute (and float parameter) dtype, default float32."""
    from kdjax.checkpoint import model_from_hf_tensors
    from kdjax.quant.aqt_pass import to_int4_model

    cfg, qm, tensors = read_gptq(path)
    if dtype is not None:
        import jax.numpy as jnp
        cfg = cfg.replace(dtype=jnp.dtype(dtype).name, param_dtype=jnp.dtype(dtype).name)
    return to_int4_model(model_from_hf_tensors(cfg, tensors, source=path), qm), qm
