"""Checkpoints in and out: HF safetensors (single or sharded), GGUF, kdjax (orbax), pip presets.

Parameters are read tensor by tensor and placed straight onto their devices (with their mesh
sharding when a mesh is given), so a model never needs two full copies in host memory.
The HF <-> kdjax names come from the family's tensor table (kdjax/families.py), both directions.
"""
from __future__ import annotations

import json
import os
import re
import struct
from typing import Iterable, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from kdjax.config import ModelConfig, load_hf_config
from kdjax.model import CausalLM

# Tensors HF checkpoints may carry that the model does not use.
_IGNORED = re.compile(r".*rotary_emb\.inv_freq\Z")


# ---- safetensors, read and written directly (bf16 included, lazily, with clear errors) ----------
_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64,
              "I32": np.int32, "I64": np.int64, "I8": np.int8, "U8": np.uint8, "I16": np.int16}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


def _read_st_header(file: str) -> tuple[dict, int]:
    size = os.path.getsize(file)
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{file}: truncated safetensors file (no header)")
        (n,) = struct.unpack("<Q", raw)
        if 8 + n > size:
            raise ValueError(f"{file}: truncated safetensors file (header of {n} bytes, file of {size})")
        try:
            header = json.loads(f.read(n))
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}: corrupt safetensors header ({e.msg})") from None
    header.pop("__metadata__", None)
    start = 8 + n
    for name, info in header.items():
        end = start + info["data_offsets"][1]
        if end > size:
            raise ValueError(f"{file}: truncated safetensors file: tensor {name!r} ends at byte {end}, "
                             f"the file has {size} (an incomplete download or copy?)")
        if info["dtype"] not in _ST_DTYPES:
            raise ValueError(f"{file}: tensor {name!r} has unsupported dtype {info['dtype']}")
        a, b = info["data_offsets"]
        want = int(np.prod(info["shape"], dtype=np.int64)) * np.dtype(_ST_DTYPES[info["dtype"]]).itemsize
        if b - a != want:
            raise ValueError(f"{file}: tensor {name!r} of shape {info['shape']} ({info['dtype']}) needs {want} bytes, "
                             f"its header gives {b - a} (data_offsets {a}..{b}): a corrupt or mis-written file")
    return header, start


def read_safetensors(file: str) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (name, array) one at a time from a memory map of the file."""
    header, start = _read_st_header(file)
    mm = np.memmap(file, dtype=np.uint8, mode="r")
    for name, info in header.items():
        a, b = info["data_offsets"]
        yield name, mm[start + a:start + b].view(_ST_DTYPES[info["dtype"]]).reshape(info["shape"])


def write_safetensors(file: str, tensors: Iterable[tuple[str, np.ndarray]], shapes: dict, metadata=None):
    """Streams tensors to `file`. `shapes` maps name -> (shape, numpy dtype), known before the data."""
    header, offset = {}, 0
    for name, (shape, dtype) in shapes.items():
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": _ST_NAMES[np.dtype(dtype)], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = file + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name, arr in tensors:
            want = shapes[name]
            arr = np.ascontiguousarray(arr, dtype=want[1])
            if tuple(arr.shape) != tuple(want[0]):
                raise ValueError(f"{file}: tensor {name} has shape {arr.shape}, header says {want[0]}")
            f.write(arr.tobytes())
    os.replace(tmp, file)  # never leave a half-written checkpoint under the real name


def hf_tensor_files(path: str) -> dict[str, str]:
    """Maps tensor name -> safetensors file of an HF directory (single file or sharded index)."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        for shard in sorted(set(weight_map.values())):
            if not os.path.exists(os.path.join(path, shard)):
                raise FileNotFoundError(f"{os.path.join(path, shard)}: shard listed in {index} is missing")
        return {k: os.path.join(path, v) for k, v in weight_map.items()}
    single = os.path.join(path, "model.safetensors")
    if not os.path.exists(single):
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
    header, _ = _read_st_header(single)
    return {k: single for k in header}


def iter_hf_dir(path: str) -> Iterator[tuple[str, np.ndarray]]:
    files = hf_tensor_files(path)
    for file in sorted(set(files.values())):
        yield from read_safetensors(file)


# ---- building a model from a stream of HF tensors ----------------------------------------------
def _flat_vars(model) -> dict[str, nnx.Variable]:
    _, state = nnx.split(model)
    return {".".join(map(str, p)): v for p, v in nnx.to_flat_state(state)}


def _placement(var, mesh):
    if mesh is None:
        return None
    from kdjax.sharding import logical_to_spec
    axes = var.get_metadata().get("axes")
    spec = logical_to_spec(axes, var.shape, mesh) if axes else jax.sharding.PartitionSpec()
    return jax.sharding.NamedSharding(mesh, spec)


def model_from_hf_tensors(cfg: ModelConfig, tensors: Iterable[tuple[str, np.ndarray]], *, mesh=None,
                          source: str = "checkpoint") -> CausalLM:
    """Fills an abstract model tensor by tensor; every parameter must be given exactly once."""
    family = cfg.family
    model = nnx.eval_shape(lambda: CausalLM(cfg))
    graphdef, state = nnx.split(model)
    flat = nnx.to_flat_state(state)
    variables = {".".join(map(str, p)): v for p, v in flat}
    filled = set()
    for name, arr in tensors:
        hit = family.kdjax_name(name)
        if hit is None:
            if _IGNORED.match(name) or (name == "lm_head.weight" and cfg.tie_word_embeddings):
                continue
            raise ValueError(f"{source}: unexpected tensor {name!r} for a {cfg.architecture} model")
        path, transpose = hit
        if path not in variables:
            raise ValueError(f"{source}: tensor {name!r} does not fit the config (no parameter {path})")
        var = variables[path]
        arr = arr.T if transpose else arr
        if tuple(arr.shape) != tuple(var.shape):
            raise ValueError(f"{source}: tensor {name!r} has shape {tuple(arr.shape)} (as {path}: {arr.shape}), "
                             f"the config implies {tuple(var.shape)}")
        value = np.asarray(arr).astype(var.dtype)
        sh = _placement(var, mesh)
        var.set_value(jax.device_put(value, sh) if sh is not None else jnp.asarray(value))
        filled.add(path)
    missing = sorted(set(variables) - filled)
    if missing:
        raise ValueError(f"{source}: missing tensors for {', '.join(family.hf_name(m)[0] for m in missing[:5])}"
                         f"{' ...' if len(missing) > 5 else ''} ({len(missing)} in all)")
    return nnx.merge(graphdef, state)


def hf_state_dict(model: CausalLM, dtype=None) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (HF name, numpy array in torch layout) for every parameter, one at a time."""
    family = model.config.family
    for path, var in _flat_vars(model).items():
        name, transpose = family.hf_name(path)
        value = var[...]
        if not value.is_fully_addressable:  # multi-host: every process joins the gather
            from jax.experimental import multihost_utils
            value = multihost_utils.process_allgather(value, tiled=True)
        arr = np.asarray(jax.device_get(value))
        if dtype is not None:
            arr = arr.astype(dtype)
        yield name, (arr.T if transpose else arr)


# ---- the public load / save --------------------------------------------------------------------
def tokenizer_from_dir(path: str):
    """The transformers tokenizer saved in directory `path`, or None when it holds none."""
    if not any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path)


def _overrides(dtype, param_dtype, **runtime):
    """ModelConfig fields to change on load: dtypes, and runtime options (remat, remat_policy,
    attention) that are not part of the weights; None = keep the stored value."""
    o = {k: v for k, v in runtime.items() if v is not None}
    if dtype is not None:
        o["dtype"] = jnp.dtype(dtype).name
    if param_dtype is not None:
        o["param_dtype"] = jnp.dtype(param_dtype).name
    elif dtype is not None:
        o["param_dtype"] = jnp.dtype(dtype).name
    return o


def _from_hub(repo_id: str) -> str:
    """Downloads (or finds in the local HF cache) the config, safetensors and tokenizer of a hub repo."""
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.txt"])
    except Exception as e:  # offline, unknown repo, no access: say what was tried
        raise FileNotFoundError(f"{repo_id}: not a local path or preset, and the model hub gave no copy "
                                f"({type(e).__name__}: {e}); pass a local HF directory instead") from None


def resolve(src: str) -> str:
    """The local path of a model source: an existing path as it is, a preset name as the GGUF file
    inside its pip package, a hub id ("Qwen/Qwen2.5-0.5B-Instruct") as its downloaded snapshot.
    Anything else is a FileNotFoundError that says which of these it was taken for."""
    if os.path.exists(src):
        return src
    from kdjax import gguf_io
    if src.endswith(".gguf"):
        raise FileNotFoundError(f"{src}: no such GGUF file")
    if src.lower() in gguf_io.PRESETS:
        return gguf_io.preset_path(src)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", src) and not src.startswith((".", "/", "~")):
        return _from_hub(src)
    raise FileNotFoundError(f"{src}: no such model directory or file, and not a preset name "
                            f"(presets: {', '.join(sorted(gguf_io.PRESETS))})")


def load_tokenizer(src: str):
    """The tokenizer of a model source (the forms `load` takes) without reading its weights, or
    None when the directory has none."""
    src = resolve(src)
    if src.endswith(".gguf"):
        from kdjax import gguf_io
        return gguf_io.read_gguf(src)[2]
    if os.path.isdir(src):
        return tokenizer_from_dir(src)
    raise FileNotFoundError(f"{src}: not a model directory, .gguf file or preset name")


def load(src: str, *, dtype=None, param_dtype=None, mesh=None, remat=None, remat_policy=None, attention=None):
    """Loads `(model, tokenizer)` from an HF directory, a .gguf file, a kdjax checkpoint directory,
    a preset name of a model that ships in a pip package (`smollm2-135m-instruct`), or a hub
    repo id such as `Qwen/Qwen2.5-0.5B-Instruct` (when a hub or the local HF cache has it).

    dtype: compute dtype (and parameter dtype unless `param_dtype` is given). mesh: place every
    parameter with its logical sharding on this mesh as it is read. remat, remat_policy, attention:
    runtime options of the loaded ModelConfig (kdjax.config).
    """
    ov = _overrides(dtype, param_dtype, remat=remat, remat_policy=remat_policy, attention=attention)
    src = resolve(src)
    if src.endswith(".gguf"):
        from kdjax import gguf_io
        hf_cfg, tensors, tokenizer = gguf_io.read_gguf(src)
        cfg = ModelConfig.from_hf(hf_cfg, source=src, **ov)
        return model_from_hf_tensors(cfg, tensors, mesh=mesh, source=src), tokenizer
    if os.path.isdir(src) and os.path.exists(os.path.join(src, KDJAX_CONFIG)):
        return load_kdjax(src, mesh=mesh, **ov), tokenizer_from_dir(src)
    if os.path.isdir(src):
        cfg = load_hf_config(src, **ov)
        return model_from_hf_tensors(cfg, iter_hf_dir(src), mesh=mesh, source=src), tokenizer_from_dir(src)
    raise FileNotFoundError(f"{src}: not a model directory, .gguf file or preset name")


KDJAX_CONFIG = "kdjax_config.json"


def save(model: CausalLM, dst: str, format: str = "kdjax", *, tokenizer=None, dtype=None):
    """Writes `model` to directory `dst`: format "kdjax" (orbax) or "hf" (safetensors + config.json,
    loadable by transformers.AutoModelForCausalLM). dtype: tensor dtype for "hf" (default: as stored)."""
    os.makedirs(dst, exist_ok=True)
    cfg = model.config
    if format == "hf":
        np_dtype = np.dtype(jnp.dtype(dtype)) if dtype is not None else None
        shapes = {}
        for path, var in _flat_vars(model).items():
            name, transpose = cfg.family.hf_name(path)
            shape = tuple(reversed(var.shape)) if transpose else tuple(var.shape)
            shapes[name] = (shape, np_dtype or np.dtype(var.dtype))
        tensors = hf_state_dict(model, np_dtype)
        if jax.process_index() != 0:  # one writer; the others only join the gathers
            for _ in tensors:
                pass
            return dst
        write_safetensors(os.path.join(dst, "model.safetensors"), tensors, shapes, metadata={"format": "pt"})
        torch_dtype = str(np.dtype(next(iter(shapes.values()))[1]))
        with open(os.path.join(dst, "config.json"), "w") as f:
            json.dump(cfg.to_hf(torch_dtype), f, indent=2)
    elif format == "kdjax":
        import orbax.checkpoint as ocp
        _, state = nnx.split(model)
        params = os.path.abspath(os.path.join(dst, "params"))
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(params, nnx.to_pure_dict(state), force=True)
        if jax.process_index() == 0:
            with open(os.path.join(dst, KDJAX_CONFIG), "w") as f:
                json.dump(dataclasses_asdict(cfg), f, indent=2)
    else:
        raise ValueError(f"save: format={format!r}; expected 'kdjax' or 'hf'")
    if tokenizer is not None and jax.process_index() == 0:
        tokenizer.save_pretrained(dst)
    return dst


def dataclasses_asdict(cfg):
    import dataclasses
    return dataclasses.asdict(cfg)


def load_kdjax(path: str, *, mesh=None, **overrides) -> CausalLM:
    import orbax.checkpoint as ocp
    with open(os.path.join(path, KDJAX_CONFIG)) as f:
        stored = json.load(f)
    cfg = ModelConfig(**stored).replace(**overrides)
    # Read into the target config unless the parameter dtype changes (then cast after reading):
    # runtime options (compute dtype, remat, attention) need no copy of the weights.
    same_dtype = cfg.param_dtype == stored.get("param_dtype", cfg.param_dtype)
    read_cfg = cfg if same_dtype else ModelConfig(**stored)
    model = nnx.eval_shape(lambda: CausalLM(read_cfg))
    graphdef, state = nnx.split(model)
    flat = dict(nnx.to_flat_state(state))

    def target(p, v):
        sh = _placement(v, mesh) if mesh is not None else jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sh)

    abstract = nnx.to_pure_dict(nnx.from_flat_state({p: v.replace(target(p, v)) for p, v in flat.items()}))
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(os.path.abspath(os.path.join(path, "params")), abstract)
    nnx.replace_by_pure_dict(state, restored)
    model = nnx.merge(graphdef, state)
    if not same_dtype:
        new = nnx.eval_shape(lambda: CausalLM(cfg))
        g2, s2 = nnx.split(new)
        src = {p: v for p, v in nnx.to_flat_state(nnx.split(model)[1])}
        for p, v in nnx.to_flat_state(s2):
            v.set_value(src[p][...].astype(v.dtype))
        model = nnx.merge(g2, s2)
    return model
