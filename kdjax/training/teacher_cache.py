"""Teacher once, students many: the teacher's sparse distribution over a run's training rows, on disk.

`build(cfg, out)` (`kdjax teacher-cache`) runs the teacher over the training rows a KD run with
`cfg` reads (the same tokenisation, packing and order: `distill.prepare`, `data.batch_indices`) and
stores, for every response token, the teacher's top-K token ids, their log-probs at kd.temperature
and the log of the teacher's mass outside them; optionally tokens drawn from the teacher besides
(from its tail) or instead (top_k = 0), whose counts estimate the teacher without bias ("Sparse
Logit Sampling", Anshumann et al. 2025, arXiv 2503.16870). `open_for(cfg, tokenizer, rows)` checks
that a store fits a run, before any model is loaded, and reads a batch's rows of it; KD then runs
`losses.chunked_sparse_distill_loss` on them with no teacher in memory.

The store is a zarr v3 hierarchy written through tensorstore, chunked by rows:

    DIR/zarr.json  the group; attribute "kdjax_teacher_cache": what it is of (the teacher's and the
                   tokenizer's sha256, the rows' sha256, data fields, temperature, K, samples, dtype,
                   the config), and once complete its size and build time
    DIR/rows       int32 [M]: the training-row index of each cached row, in the order a run first reads them
    DIR/ids        int32 [M, T, K + S]: the top K ids (descending), then the drawn ones (-1: empty slot)
    DIR/logp       bf16 | fp16 | fp32 [M, T, K + S]: the teacher's log-prob of each id; a drawn id:
                   log(tail mass * count / S), so drawn weights sum to the tail they stand for
    DIR/log_rest   fp32 [M, T]: the log of the teacher's mass outside the top K
    DIR/tail_coef  (cache.tail_rank > 0) coefficients whose product with tail_basis approximates the
                   token's teacher logits (at temperature 1): with cache.tail_bytes = B > 0, uint8
                   [M, T, <= B], each token's r coefficients bit-packed (encode_tail: direction j in
                   tail_bits[j] bits, a uniform quantizer of step tail_step[j] around tail_mean[j]);
                   with B = 0, [M, T, r] in the log-probs' dtype
    DIR/tail_basis fp32 [r, V] and DIR/tail_encoder fp32 [D, r] (coef = final hidden state @ encoder):
                   the r directions of the teacher's logits that vary most over the response tokens
                   of the first FIT_ROWS rows (fit_tail); training spreads each token's tail mass in proportion
                   to exp(coef @ basis / temperature) instead of keeping it one bucket
    DIR/tail_bits int32, tail_step, tail_mean fp32 [r] (B > 0): the code of each direction (plan_tail);
                   r is the directions that got bits, at most cache.tail_rank
    DIR/done       uint8 [chunks]: 1 once chunk c (rows c R .. c R + R - 1, R = cache.chunk_rows) is written

Off the response tokens every array holds 0. A chunk is written whole (one file an array, which
tensorstore replaces by a rename) and marked done only after, so a killed build leaves whole chunks
marked; a rerun skips them and recomputes the rest, and a reader refuses a store with a chunk
unmarked. On several processes (`--distributed`) each takes every n-th chunk and runs the teacher
on its own devices, each device cache.batch_size rows a pass: the arrays do not depend on how many
processes wrote them. The teacher must fit on one device (it is replicated, not sharded).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import shutil
import time
from functools import partial

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from kdjax import data as kdata
from kdjax import losses
from kdjax.errors import ConfigError, UserError
from kdjax.sharding import barrier, make_mesh

FORMAT = 1
ATTR = "kdjax_teacher_cache"
DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16, "float32": np.float32}
NO_TAIL = -np.inf  # log_tail of a token whose tail mass all went to drawn tokens
FIT_ROWS = 128  # the first rows of a store, whose response tokens the tail basis is fitted on
CODE_ARRAYS = (("bits", "int32"), ("step", "float32"), ("mean", "float32"))  # a packed tail's code, a direction
MAX_BITS = 16  # of one packed coefficient
# Half the range of the MSE-optimal uniform quantizer of a unit Gaussian with 2^b levels, in standard
# deviations (2^(b-1) x the optimal step in Max 1960, "Quantizing for minimum distortion"), b = 1 .. 8;
# +0.3 a bit beyond
_HALF_RANGE = (1.596, 1.991, 2.344, 2.681, 3.009, 3.331, 3.642, 3.942)


class CacheError(UserError):
    """A store that cannot be used as asked (missing, incomplete, of another run)."""


# ---- what a cache is of ---------------------------------------------------------------------------
def check_config(cfg):
    """The cache.* fields, and what a cached run may ask of them."""
    c = cfg.cache
    for name in ("top_k", "samples"):
        if c[name] < 0:
            raise ConfigError(f"cache.{name}", f"={c[name]}: must be >= 0")
    if c.top_k + c.samples < 1:
        raise ConfigError("cache.top_k", f"={c.top_k} with cache.samples={c.samples}: a cache needs tokens")
    if c.dtype not in DTYPES:
        raise ConfigError("cache.dtype", f"={c.dtype!r}: expected one of {', '.join(DTYPES)}")
    if c.rows not in ("run", "all"):
        raise ConfigError("cache.rows", f"={c.rows!r}: 'run' (the rows train.steps batches read) or 'all'")
    for name in ("chunk_rows", "batch_size"):
        if c[name] < 1:
            raise ConfigError(f"cache.{name}", f"={c[name]}: must be >= 1")
    if c.tail_rank < 0:
        raise ConfigError("cache.tail_rank", f"={c.tail_rank}: must be >= 0 (0: the tail as one bucket)")
    if c.tail_bytes < 0:
        raise ConfigError("cache.tail_bytes", f"={c.tail_bytes}: must be >= 0 (0: the tail's coefficients "
                                              f"unquantized, in cache.dtype)")
    if c.tail_rank and c.samples:
        raise ConfigError("cache.tail_rank", f"={c.tail_rank} with cache.samples={c.samples}: drawn tokens carry "
                                             f"the tail; choose one (cache.samples=0, or cache.tail_rank=0)")


def file_sha256(path: str) -> str:
    """sha256 of a file, or of every file under a directory (relative names and contents, sorted)."""
    h = hashlib.sha256()
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)
    for name in files:
        h.update(os.path.relpath(name, path).encode() + b"\0")
        with open(name, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def teacher_sha256(src: str) -> str | None:
    """sha256 of the teacher's files (kdjax.checkpoint.resolve: a preset is its .gguf), or None
    when they are not on this machine."""
    from kdjax.checkpoint import resolve
    try:
        return file_sha256(resolve(src))
    except (FileNotFoundError, OSError):
        return None


def tokenizer_sha256(tokenizer) -> str:
    """sha256 of what makes the token ids: the tokenizer's full definition (vocabulary, merges,
    normalisation) and its special ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    special = [getattr(tokenizer, f"{k}_token_id", None) for k in ("bos", "eos", "pad")]
    return hashlib.sha256((text + json.dumps(special)).encode()).hexdigest()


def rows_sha256(rows: dict) -> str:
    """sha256 of token rows (every array of kdata.ROW_KEYS, shape and bytes)."""
    h = hashlib.sha256()
    for k in kdata.ROW_KEYS:
        a = np.ascontiguousarray(rows[k])
        h.update(f"{k}{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def rows_read(cfg, n: int) -> np.ndarray:
    """The training rows (indices of n) a run of cfg reads in its train.steps batches (or
    train.epochs passes, as kdjax.training.loop.resolve_steps counts them), in the order it first
    reads them."""
    tc = cfg.train
    steps = max(1, math.ceil(tc.epochs * n / tc.batch_size)) if tc.epochs else tc.steps
    seen: dict[int, None] = {}
    for step in range(steps):
        seen.update(dict.fromkeys(kdata.batch_indices(n, step, batch_size=cfg.train.batch_size,
                                                      seed=cfg.train.seed).tolist()))
        if len(seen) == n:
            break
    return np.asarray(list(seen), np.int32)


def cached_rows(cfg, n: int) -> np.ndarray:
    """The rows a cache of cfg holds, in store order: those the run reads, first read first, then
    (cache.rows = "all") the others in index order."""
    order = rows_read(cfg, n)
    if cfg.cache.rows == "all":
        rest = np.setdiff1d(np.arange(n, dtype=np.int32), order)
        order = np.concatenate([order, rest])
    return order


# The fields a store is compared on, in the order a mismatch is reported: (attribute, the flag it
# comes from, its value in a config).
FIELDS = (("max_length", "data.max_length", lambda c: c.data.max_length),
          ("packing", "data.packing", lambda c: bool(c.data.packing)),
          ("template", "data.template", lambda c: c.data.template),
          ("temperature", "kd.temperature", lambda c: float(c.kd.temperature)))
# What building adds: a store is finished only by a build of the same content.
BUILD_FIELDS = (("top_k", "cache.top_k", lambda c: c.cache.top_k),
                ("samples", "cache.samples", lambda c: c.cache.samples),
                ("dtype", "cache.dtype", lambda c: c.cache.dtype),
                ("chunk_rows", "cache.chunk_rows", lambda c: c.cache.chunk_rows),
                ("seed", "cache.seed", lambda c: c.cache.seed if c.cache.samples else 0),
                ("tail_rank", "cache.tail_rank", lambda c: c.cache.tail_rank),
                ("tail_bytes", "cache.tail_bytes", lambda c: c.cache.tail_bytes if c.cache.tail_rank else 0))
DATA_FIELDS = ("data.source", "data.layout", "data.stdlib_pairs", "data.limit", "data.seed", "data.valid", "data.test")


def order_sha256(order: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(order, np.int32).tobytes()).hexdigest()


def describe(cfg, tokenizer, train_rows: dict, order: np.ndarray) -> dict:
    """The attributes of a store of cfg's teacher over `order` of `train_rows`."""
    from kdjax.training.rundir import flat_config
    return dict(format=FORMAT, **{a: get(cfg) for a, _, get in FIELDS + BUILD_FIELDS},
                teacher=cfg.teacher, teacher_sha256=teacher_sha256(cfg.teacher),
                tokenizer_sha256=tokenizer_sha256(tokenizer), rows_sha256=rows_sha256(train_rows),
                train_rows=len(train_rows["input_ids"]), cached_rows=len(order),
                order_sha256=order_sha256(order),
                config=flat_config(cfg))


def mismatch(stored: dict, cfg, tokenizer, train_rows: dict, *, build: bool = False,
             teacher: bool = True) -> str | None:
    """Why a store (its attributes) is not of cfg's run, naming the field; None when it is.
    build: also the fields that decide the store's content and layout (finishing a build);
    teacher: also the teacher's files (when they are on this machine)."""
    if stored.get("format") != FORMAT:
        return f"it is in store format {stored.get('format')}, this kdjax writes {FORMAT}"
    for attr, flag, get in FIELDS + (BUILD_FIELDS if build else ()):
        if stored.get(attr, 0) != get(cfg):  # a store from before tail_rank existed has none: 0
            return f"it was built with {flag}={stored.get(attr, 0)!r}, this run has {flag}={get(cfg)!r}"
    if stored["tokenizer_sha256"] != tokenizer_sha256(tokenizer):
        return (f"it was built with another tokenizer (that of {stored['teacher']}) than --config.teacher="
                f"{cfg.teacher}'s")
    if stored["rows_sha256"] != rows_sha256(train_rows):
        old = stored.get("config", {})
        changed = [f"{k}={old.get(k)!r} -> {v!r}" for k, v in
                   ((k, cfg.data[k.split(".")[1]]) for k in DATA_FIELDS) if old.get(k) != v]
        return ("its training rows differ from this run's (" + (", ".join(changed) if changed else
                "the same data fields: the data file or the library's text changed") + ")")
    sha = teacher_sha256(cfg.teacher) if teacher else None
    if sha is not None and stored["teacher_sha256"] not in (None, sha):
        return (f"it was built from another teacher ({stored['teacher']}, sha256 {stored['teacher_sha256'][:12]}) "
                f"than --config.teacher={cfg.teacher} (sha256 {sha[:12]})")
    return None


def not_of_run(path: str, stored: dict, cfg, tokenizer, train_rows: dict, *, teacher: bool = True) -> str | None:
    """Why the store at `path` (attributes `stored`) cannot serve cfg's run, or None. A complete
    store serves it when it is of its data, tokenizer, temperature and teacher and holds every row
    the run reads, whatever its K; an unfinished one only when this config would finish it as begun."""
    n = len(train_rows["input_ids"])
    if stored.get("complete"):
        why = mismatch(stored, cfg, tokenizer, train_rows, teacher=teacher)
        held = open_arrays(path, stored)["rows"].read().result()
        lost = 0 if why else len(np.setdiff1d(rows_read(cfg, n), held))
        return why or (f"it lacks {lost} of the rows train.steps={cfg.train.steps} batches of "
                       f"{cfg.train.batch_size} with train.seed={cfg.train.seed} read" if lost else None)
    why = mismatch(stored, cfg, tokenizer, train_rows, build=True, teacher=teacher)
    if not why and stored["order_sha256"] != order_sha256(cached_rows(cfg, n)):
        why = "it holds other rows (train.steps / train.batch_size / train.seed / cache.rows differ)"
    return why


def refuse_other(cfg, tokenizer, train_rows: dict, *, teacher: bool = True):
    """A CacheError when kd.teacher_cache holds a store that cannot serve cfg's run (what a pipeline
    says before it trains anything); nothing when it holds none or a fitting one."""
    path = cfg.kd.teacher_cache
    stored = read_attrs(path)
    why = stored and not_of_run(path, stored, cfg, tokenizer, train_rows, teacher=teacher)
    if why:
        raise CacheError(f"--config.kd.teacher_cache={path} holds a teacher cache of another run: {why}. Point it "
                         f"at another directory, or --overwrite to build it again")


# ---- the store ---------------------------------------------------------------------------------------
def read_attrs(path: str) -> dict | None:
    """A store's attributes, or None when `path` holds none."""
    try:
        with open(os.path.join(path, "zarr.json")) as f:
            return json.load(f).get("attributes", {}).get(ATTR)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except json.JSONDecodeError as e:
        raise CacheError(f"{path}/zarr.json: not valid JSON ({e.msg}); not a teacher cache") from None


def write_attrs(path: str, attrs: dict):
    """The group's zarr.json, replaced whole (written beside, then renamed)."""
    tmp = os.path.join(path, f".zarr.json.{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump({"zarr_format": 3, "node_type": "group", "attributes": {ATTR: attrs}}, f, indent=1)
    os.replace(tmp, os.path.join(path, "zarr.json"))


def _spec(path: str, name: str, shape=None, chunks=None, dtype=None) -> dict:
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": os.path.join(path, name)}}
    if shape is not None:
        spec["metadata"] = {"shape": list(shape), "data_type": dtype, "fill_value": 0,
                            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunks)}},
                            "codecs": [{"name": "bytes", "configuration": {"endian": "little"}},
                                       {"name": "zstd", "configuration": {"level": 3}}]}
    return spec


def _shapes(attrs: dict, width: int) -> dict:
    """name -> (shape, chunk shape, dtype) of a store's arrays; width = data.max_length."""
    m, r, k = attrs["cached_rows"], attrs["chunk_rows"], attrs["top_k"] + attrs["samples"]
    out = {"rows": ((m,), (m,), "int32"), "ids": ((m, width, k), (r, width, k), "int32"),
           "logp": ((m, width, k), (r, width, k), attrs["dtype"]),
           "log_rest": ((m, width), (r, width), "float32"), "done": ((-(-m // r),), (1,), "uint8")}
    rank, packed = tail_dims(attrs), attrs.get("tail_packed", 0)
    if rank:
        v, d = attrs["vocab_size"], attrs["hidden_size"]
        coef = ((m, width, packed), (r, width, packed), "uint8") if packed else (
            (m, width, rank), (r, width, rank), attrs["dtype"])
        out.update(tail_coef=coef, tail_basis=((rank, v), (rank, v), "float32"),
                   tail_encoder=((d, rank), (d, rank), "float32"))
        if packed:
            out.update({f"tail_{a}": ((rank,), (rank,), t) for a, t in CODE_ARRAYS})
    return out


def tail_dims(attrs: dict) -> int:
    """The coefficients a token of a store's tail (0: no tail): the directions fitted (cache.tail_rank,
    at most the teacher's hidden size), with packed coefficients those of them that got bits."""
    return attrs.get("tail_dims", attrs.get("tail_rank", 0))


def tail_code(arrays: dict, attrs: dict) -> dict | None:
    """A store's packed tail code {"bits", "step", "mean"} (decode_tail's arguments); None when its
    coefficients are not packed."""
    return {a: arrays[f"tail_{a}"].read().result() for a, _ in CODE_ARRAYS} if attrs.get("tail_packed") else None


def open_arrays(path: str, attrs: dict, *, create: bool = False) -> dict:
    """The store's tensorstore arrays (created, empty, with `create`)."""
    import tensorstore as ts
    out = {}
    for name, (shape, chunks, dtype) in _shapes(attrs, attrs["max_length"]).items():
        spec = _spec(path, name, shape, chunks, dtype) if create else _spec(path, name)
        out[name] = ts.open(spec, create=create, open=not create, delete_existing=create).result()
    return out


def store_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


class TeacherCache:
    """A complete store, opened for reading batches of training rows."""

    def __init__(self, path: str):
        self.path = path
        attrs = read_attrs(path)
        if attrs is None:
            raise CacheError(f"{path}: no teacher cache here (build one: kdjax teacher-cache --config=... --out={path})")
        self.attrs = attrs
        self.arrays = open_arrays(path, attrs)
        done = self.arrays["done"].read().result()
        if not done.all():
            raise CacheError(f"{path}: an incomplete teacher cache ({int(done.sum())} of {len(done)} chunks written): "
                             f"run the same kdjax teacher-cache command again to finish it")
        self.order = self.arrays["rows"].read().result()
        self.where = np.full(attrs["train_rows"], -1, np.int64)  # training row -> store row
        self.where[self.order] = np.arange(len(self.order))
        self.vocab_size, self.top_k, self.samples = attrs["vocab_size"], attrs["top_k"], attrs["samples"]
        self.tail_rank = tail_dims(attrs)
        self.code = tail_code(self.arrays, attrs)
        self._basis = None

    @property
    def tail_basis(self) -> np.ndarray | None:
        """The [r, V] basis of the tail's logits (None: the tail is one bucket)."""
        if self.tail_rank and self._basis is None:
            self._basis = self.arrays["tail_basis"].read().result()
        return self._basis

    def missing(self, rows: np.ndarray) -> np.ndarray:
        """The training rows of `rows` the store does not hold."""
        return rows[self.where[rows] < 0]

    def read(self, rows: np.ndarray, part: slice = slice(None)) -> dict:
        """The sparse teacher of training rows [B] (kdjax.losses' sparse arguments): {"ids" int32,
        "logp" [B, T, K + S], "log_tail" float32 [B, T]}; only the rows in `part` are read (a
        process's own), the others are zeros."""
        b, (_, t, k) = len(rows), self.arrays["ids"].shape
        dtype = DTYPES[self.attrs["dtype"]]
        out = {"ids": np.zeros((b, t, k), np.int32), "logp": np.zeros((b, t, k), dtype),
               "log_tail": np.zeros((b, t), np.float32)}
        if self.tail_rank:
            out["tail_coef"] = np.zeros((b, t, self.tail_rank), np.float32 if self.code else dtype)
        picked = self.where[rows[part]]
        if len(picked):
            unique, back = np.unique(picked, return_inverse=True)
            got = {name: self.arrays[name][unique].read() for name in token_arrays(self.tail_rank)}
            out["ids"][part] = got["ids"].result()[back]
            out["logp"][part] = got["logp"].result()[back]
            if self.tail_rank:
                coef = got["tail_coef"].result()[back]
                out["tail_coef"][part] = decode_tail(coef, **self.code) if self.code else coef
            rest = got["log_rest"].result()[back]
            out["log_tail"][part] = NO_TAIL if self.samples else rest  # drawn tokens carry the tail
        return out


def open_for(cfg, tokenizer, train_rows: dict) -> TeacherCache:
    """The store of cfg.kd.teacher_cache, checked against the run (its data fields, tokenizer,
    training rows, teacher; that it holds every row train.steps batches read; that the divergence
    is defined on it), before any model is loaded. Mismatches are ConfigErrors naming the field."""
    path = cfg.kd.teacher_cache
    cache = TeacherCache(path)
    why = mismatch(cache.attrs, cfg, tokenizer, train_rows)
    if why:
        raise ConfigError("kd.teacher_cache", f"={path}: {why}. Build a cache for this run (kdjax teacher-cache "
                                              f"--config=... --out=DIR) or run with the cache's values")
    lost = cache.missing(rows_read(cfg, len(train_rows["input_ids"])))
    if len(lost):
        raise ConfigError("kd.teacher_cache", f"={path}: holds {len(cache.order)} of the training rows, not the "
                                              f"{len(lost)} more that train.steps={cfg.train.steps} batches of "
                                              f"{cfg.train.batch_size} with train.seed={cfg.train.seed} read; build "
                                              f"it with --config.cache.rows=all, or with this run's train.* values")
    reverse = cfg.kd.divergence == "reverse_kl" or (cfg.kd.divergence == "generalized_jsd" and cfg.kd.beta == 1)
    if cache.samples and reverse:
        raise ConfigError("kd.divergence", f"={cfg.kd.divergence!r}: reverse KL needs the teacher's mass wherever "
                                           f"the student has some, and {path} holds drawn tokens "
                                           f"(cache.samples={cache.samples}) without a tail; use forward KL, JSD, "
                                           f"skew KL or TV, or a top-K cache")
    return cache


def token_arrays(tail_rank: int) -> tuple[str, ...]:
    """The arrays a store holds for each response token."""
    return ("ids", "logp", "log_rest") + (("tail_coef",) if tail_rank else ())


def token_bytes(attrs: dict) -> int:
    """Bytes a response token takes in a store of these attributes, uncompressed."""
    item = np.dtype(DTYPES[attrs["dtype"]]).itemsize
    tail = attrs.get("tail_packed") or item * tail_dims(attrs)
    return (4 + item) * (attrs["top_k"] + attrs["samples"]) + 4 + tail


# ---- building it ------------------------------------------------------------------------------------
def draw(key, t_logp, top_ids, samples: int):
    """`samples` tokens a position [..., S] drawn from the teacher t_logp [..., V] outside its top ids
    [..., K] (from its whole distribution when K = 0), with replacement: their counts / S estimate
    the teacher's tail, renormalised, without bias (pack_tokens turns them into weights)."""
    tail = jnp.where(losses.support_mask(top_ids, t_logp.shape[-1]), -jnp.inf, t_logp)
    drawn = jax.random.categorical(key, tail, axis=-1, shape=(samples, *tail.shape[:-1]))
    return jnp.moveaxis(drawn, 0, -1).astype(jnp.int32)


def _teacher_pass(params, rows_index, input_ids, positions, segment_ids, encoder=None, *, graphdef, mesh, vocab,
                  top_k, samples, temperature, seed, packed, hidden=False):
    """The sparse teacher of P rows [P, T] (split over the mesh's "data" devices): ids [P, T, K + S]
    (the drawn ones not yet counted), logp [P, T, K] fp32, log_rest [P, T], and with `encoder` [D, r]
    the tail's coefficients [P, T, r] fp32. rows_index [P]: each row's store index, which seeds its
    draws. hidden: the final hidden states [P, T, D] fp32 instead (what fit_tail is fitted on)."""
    model = nnx.merge(graphdef, params)
    h = model.hidden_states(input_ids, positions=positions, segment_ids=segment_ids if packed else None)
    if hidden:
        return h.astype(jnp.float32)
    coef = () if encoder is None else (jnp.dot(h.astype(jnp.float32), encoder),)  # fp32: the code's top bits need it

    def device(h, w, rows_index):
        def one(xs):  # one row: its [T, V] log-probs exist only here
            hr, row = xs
            t_logp = jax.nn.log_softmax(jnp.dot(hr, w, preferred_element_type=jnp.float32) / temperature, axis=-1)
            ids, logp, rest = losses.top_k_teacher(t_logp, top_k)
            if samples:
                key = jax.random.fold_in(jax.random.PRNGKey(seed), row)
                ids = jnp.concatenate([ids, draw(key, t_logp, ids, samples)], axis=-1)
            return ids, logp, rest
        return jax.lax.map(one, (h, rows_index))

    return jax.shard_map(device, mesh=mesh, in_specs=(P("data"), P(), P("data")), out_specs=P("data"),
                         check_vma=False)(h, model.head_kernel()[:, :vocab], rows_index) + coef


def fit_tail(h: np.ndarray, w, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """(encoder [D, rank], basis [rank, V]) fp32 such that (h @ encoder) @ basis is the best rank-r
    approximation, in squared error over the vocabulary, of the logits h @ w of the hidden states
    h [N, D] it is fitted on (w [D, V], the head): with w = U S V^T, the principal directions Q of
    g = h U S, encoder = U S Q and basis = Q^T V^T; directions beyond what w spans are zero."""
    w = jnp.asarray(w, jnp.float32)
    gram = np.asarray(jnp.dot(w, w.T, preferred_element_type=jnp.float32), np.float64)
    ev, u = np.linalg.eigh(gram)
    keep = ev > ev.max() * 1e-10
    u, s = u[:, keep], np.sqrt(ev[keep])
    g = np.asarray(h, np.float64) @ u * s
    _, q = np.linalg.eigh(g.T @ g)
    q = q[:, ::-1][:, :rank]
    encoder = np.zeros((w.shape[0], rank))
    encoder[:, :q.shape[1]] = (u * s) @ q
    to_basis = np.zeros((rank, w.shape[0]), np.float32)
    to_basis[:q.shape[1]] = (q.T / s) @ u.T
    basis = np.asarray(jnp.dot(jnp.asarray(to_basis), w, preferred_element_type=jnp.float32))
    return encoder.astype(np.float32), basis


def plan_tail(coef: np.ndarray, budget_bytes: int) -> dict:
    """The code of a tail's coefficients coef [N, r] (of the fit's tokens): {"bits" [r] int32, "step",
    "mean" [r] float32}. Reverse water-filling: direction j gets round(log2(std_j / t)) bits (0 to
    MAX_BITS), t the smallest level at which they fit in 8 x budget_bytes bits, so every coded
    direction's quantization error is about the same and the directions below it are dropped
    (the squared error of the logits is the sum over directions, the basis' rows being orthonormal);
    each coded direction a uniform quantizer of 2^bits levels centred on its mean."""
    coef = np.asarray(coef, np.float64)
    mean, std = coef.mean(0), coef.std(0)

    def bits_at(t):
        with np.errstate(divide="ignore"):
            return np.clip(np.round(np.log2(std / t)), 0, MAX_BITS).astype(np.int32)

    lo, hi = std.max() * 2.0 ** -(MAX_BITS + 1), std.max() * 2.0  # too many bits at lo, none at hi
    for _ in range(60):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if bits_at(mid).sum() > 8 * budget_bytes else (lo, mid)
    bits = bits_at(hi)
    half = np.array([_HALF_RANGE[b - 1] if b <= 8 else _HALF_RANGE[-1] + 0.3 * (b - 8) for b in np.maximum(bits, 1)])
    return {"bits": bits, "step": (std * half / 2.0 ** (np.maximum(bits, 1) - 1)).astype(np.float32),
            "mean": mean.astype(np.float32)}


def _bit_layout(bits: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each packed bit's direction and place value, and where each direction's bits start."""
    comp = np.repeat(np.arange(len(bits)), bits)
    place = np.concatenate([np.arange(b) for b in bits]) if len(bits) else np.zeros(0, np.int64)
    return comp, place.astype(np.int64), np.concatenate([[0], np.cumsum(bits)[:-1]]).astype(np.int64)


def encode_tail(coef: np.ndarray, bits, step, mean) -> np.ndarray:
    """coef [..., r] -> uint8 [..., ceil(sum(bits) / 8)]: direction j's code
    clip(floor((c - mean) / step), -2^(b-1), 2^(b-1) - 1) + 2^(b-1) in its b = bits[j] bits, little-endian,
    the directions one after another. Every bits[j] must be >= 1."""
    bits = np.asarray(bits, np.int64)
    half = 2 ** (bits - 1)
    q = np.clip(np.floor((np.asarray(coef, np.float64) - mean) / step), -half, half - 1).astype(np.int64) + half
    comp, place, _ = _bit_layout(bits)
    flat = q.reshape(-1, len(bits))
    return np.packbits(((flat[:, comp] >> place) & 1).astype(np.uint8), axis=-1, bitorder="little").reshape(
        *q.shape[:-1], -1)


def decode_tail(packed: np.ndarray, bits, step, mean) -> np.ndarray:
    """encode_tail's inverse, to the middle of each code's interval: float32 [..., r]."""
    bits = np.asarray(bits, np.int64)
    comp, place, start = _bit_layout(bits)
    flat = np.unpackbits(packed.reshape(-1, packed.shape[-1]), axis=-1, bitorder="little")[:, :len(comp)]
    q = np.add.reduceat(flat.astype(np.int64) << place, start, axis=-1) - 2 ** (bits - 1)
    return ((q + 0.5) * step + mean).astype(np.float32).reshape(*packed.shape[:-1], len(bits))


def pack_tokens(ids: np.ndarray, logp: np.ndarray, rest: np.ndarray, keep: np.ndarray, top_k: int, samples: int,
                dtype, coef=None) -> tuple[np.ndarray, ...]:
    """A pass's arrays as stored: the drawn ids counted (each id once, weight log(tail mass *
    count / S), the tail mass being 1 when K = 0; empty slots -1), log-probs in the storage dtype,
    everything 0 off the response tokens (`keep` [..., T]); coef: the tail's coefficients as stored."""
    out = np.zeros(ids.shape, np.float32)
    out[..., :top_k] = logp
    ids = ids.copy()
    if samples:
        drawn = np.sort(ids[..., top_k:], axis=-1).reshape(-1, samples)
        first = np.ones(drawn.shape, bool)
        first[:, 1:] = drawn[:, 1:] != drawn[:, :-1]
        slot = np.cumsum(first, axis=-1) - 1  # each draw's place among its token's distinct ids
        row = np.broadcast_to(np.arange(len(drawn))[:, None], slot.shape)
        unique = np.full(drawn.shape, -1, np.int32)
        unique[row, slot] = drawn
        counts = np.zeros(drawn.shape)
        np.add.at(counts, (row, slot), 1.0)
        tail = np.asarray(rest, np.float64).reshape(-1, 1) if top_k else 0.0
        ids[..., top_k:] = unique.reshape(ids[..., top_k:].shape)
        out[..., top_k:] = np.where(counts > 0, tail + np.log(np.maximum(counts, 1.0) / samples), 0.0).reshape(
            out[..., top_k:].shape)
    keep = keep.astype(bool)
    return (np.where(keep[..., None], ids, 0), np.where(keep[..., None], out, 0.0).astype(dtype),
            np.where(keep, rest, 0.0).astype(np.float32)) + (
        () if coef is None else (np.where(keep[..., None], coef, 0).astype(coef.dtype),))


class _Lock:
    """flock on DIR/.lock for the process that writes the store's group (one build at a time)."""

    def __init__(self, path: str):
        self.file = open(os.path.join(path, ".lock"), "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.close()
            raise CacheError(f"{path} is being written by another kdjax teacher-cache; wait for it") from None

    def close(self):
        self.file.close()


def build(cfg, out: str, *, overwrite: bool = False, prepared=None, log=print) -> dict:
    """Writes the teacher cache of cfg's KD run into `out`, or finishes a killed build (the same
    command again), or finds it complete; returns its attributes. A store of another run in `out`
    is refused (with the field that differs) unless `overwrite`. prepared: distill.prepare(cfg)'s
    (splits, tokenizer, rows, mesh) when the caller has them."""
    from kdjax.training import distill
    from kdjax.training.loop import resolve_steps
    from kdjax.training.models import load_frozen
    check_config(cfg)
    _, tokenizer, rows, _ = prepared or distill.prepare(cfg)
    train = rows["train"]
    resolve_steps(cfg, len(train["input_ids"]))
    order = cached_rows(cfg, len(train["input_ids"]))
    writer = jax.process_index() == 0
    lock = None
    if writer:
        os.makedirs(out, exist_ok=True)
        lock = _Lock(out)
    try:
        stored = read_attrs(out)
        if stored is not None:
            why = not_of_run(out, stored, cfg, tokenizer, train)
            if why and not overwrite:
                raise CacheError(f"{out} holds a teacher cache of another run: {why}. Use another --out, or "
                                 f"--overwrite to build it again")
            if why:
                barrier("teacher cache: checked")
                if writer:
                    for name in os.listdir(out):
                        if name != ".lock":
                            p = os.path.join(out, name)
                            shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
                stored = None
        barrier("teacher cache: ready")
        return _build(cfg, out, stored, tokenizer, train, order, log, load_frozen)
    finally:
        if lock:
            lock.close()


def _build(cfg, out, stored, tokenizer, train, order, log, load_frozen):
    """build() once `out` is checked: what is left of the store (its own K, dtype, rows, chunks when
    it was begun earlier) is computed and written."""
    writer = jax.process_index() == 0
    if stored is not None:
        done = open_arrays(out, stored)["done"].read().result()
        if stored.get("complete") and done.all():
            log(f"teacher cache {out}: complete ({stored['cached_rows']} rows, {stored['bytes_per_token']:.0f} "
                f"bytes a response token)")
            return stored
    local = jax.local_devices()
    mesh = make_mesh(len(local), 1, 1, devices=local)
    t0 = time.time()
    teacher = load_frozen(cfg.teacher, cfg, mesh)[0]
    vocab = teacher.config.vocab_size
    attrs = stored or dict(describe(cfg, tokenizer, train, order), vocab_size=vocab,
                           hidden_size=teacher.config.hidden_size)
    top_k, samples, r, rank = attrs["top_k"], attrs["samples"], attrs["chunk_rows"], attrs.get("tail_rank", 0)
    if top_k + samples > vocab:
        raise ConfigError("cache.top_k", f"={top_k} (+ cache.samples={samples}) exceeds the teacher's "
                                         f"vocabulary of {vocab}")
    per_pass = cfg.cache.batch_size * len(local)
    rows_sh = NamedSharding(mesh, P("data"))
    graphdef, params = nnx.split(teacher)
    common = dict(graphdef=graphdef, mesh=mesh, vocab=vocab, top_k=top_k, samples=samples,
                  temperature=attrs["temperature"], seed=attrs["seed"], packed=attrs["packing"])

    def passes(lo, hi, fn, *extra):
        """fn's outputs (host arrays) over store rows lo .. hi - 1, per_pass rows a pass (the last
        padded with row lo), and each pass's rows."""
        for a in range(lo, hi, per_pass):
            take = np.arange(a, min(a + per_pass, hi))
            pad = np.concatenate([take, np.full(per_pass - len(take), lo)])
            rows = {k: train[k][order[pad]] for k in kdata.ROW_KEYS}
            put = lambda x: jax.device_put(x, rows_sh)
            with jax.set_mesh(mesh):
                got = fn(params, put(pad.astype(np.int32)), put(rows["input_ids"]), put(rows["positions"]),
                         put(rows["segment_ids"]), *extra)
            yield jax.tree.map(lambda x: np.asarray(x)[:len(take)], got), {k: v[:len(take)] for k, v in rows.items()}

    if stored is None and writer:  # the arrays first, the group's attributes last: a store is whole or absent
        tail = {}
        if rank:  # fitted once, on the first rows' response tokens, by one process: every pass uses these
            fit = jax.jit(partial(_teacher_pass, **common, hidden=True))
            attrs["tail_fit_rows"] = min(FIT_ROWS, len(order))
            h = np.concatenate([x[rows["loss_mask"].astype(bool)] for x, rows in
                                passes(0, attrs["tail_fit_rows"], fit)])
            encoder, basis = fit_tail(h, teacher.head_kernel()[:, :vocab], min(rank, attrs["hidden_size"]))
            attrs["tail_dims"] = encoder.shape[1]
            if attrs["tail_bytes"]:  # the directions that get bits, and their code
                code = plan_tail(h @ encoder, attrs["tail_bytes"])
                keep = code["bits"] > 0
                encoder, basis = encoder[:, keep], basis[keep]
                tail = {f"tail_{a}": x[keep] for a, x in code.items()}
                attrs.update(tail_dims=int(keep.sum()), tail_packed=-(-int(code["bits"].sum()) // 8))
            tail.update(tail_encoder=encoder, tail_basis=basis)
            log(f"teacher cache: tail basis of rank {attrs['tail_dims']} fitted on {len(h)} response tokens of the "
                f"first {attrs['tail_fit_rows']} rows" + (f", {attrs['tail_packed']} bytes a token"
                                                          if attrs["tail_bytes"] else ""))
        arrays = open_arrays(out, attrs, create=True)
        arrays["rows"].write(order).result()
        for name, x in tail.items():
            arrays[name].write(x).result()
        write_attrs(out, attrs)
    barrier("teacher cache: created")
    attrs = read_attrs(out)  # with what the writer fitted (the tail's directions and code)
    arrays = open_arrays(out, attrs)
    order = arrays["rows"].read().result()
    done = arrays["done"].read().result()
    rank = tail_dims(attrs)
    encoder = (arrays["tail_encoder"].read().result(),) if rank else ()
    code = tail_code(arrays, attrs)
    m, chunks = len(order), len(done)
    mine = [i for i in range(chunks) if i % jax.process_count() == jax.process_index() and not done[i]]
    if done.any():
        log(f"teacher cache {out}: {int(done.sum())} of {chunks} chunks written earlier, continuing")
    step = jax.jit(partial(_teacher_pass, **common))
    dtype = DTYPES[attrs["dtype"]]
    names = token_arrays(rank)
    tokens, t_start = 0, time.time()
    for n_done, i in enumerate(mine, 1):
        lo, hi = i * r, min((i + 1) * r, m)
        idx = order[lo:hi]
        parts = [pack_tokens(*got[:3], rows["loss_mask"], top_k, samples, dtype,
                             *(encode_tail(c, **code) if code else c.astype(dtype) for c in got[3:]))
                 for got, rows in passes(lo, hi, step, *encoder)]
        writes = [arrays[name][lo:hi].write(np.concatenate(p)) for name, p in zip(names, zip(*parts))]
        for w in writes:
            w.result()
        arrays["done"][i].write(np.uint8(1)).result()  # after the rows: a marked chunk is whole
        tokens += int(train["loss_mask"][idx].sum())
        rate = tokens / max(time.time() - t_start, 1e-9)
        left = (len(mine) - n_done) * (time.time() - t_start) / n_done
        log(f"teacher cache: chunk {i + 1}/{chunks} (rows {hi}/{m}), {rate:.0f} response tokens/s, "
            f"ETA {left:.0f}s")
    barrier("teacher cache: written")
    if writer:
        done = arrays["done"].read().result()
        if not done.all():
            raise CacheError(f"{out}: chunks {np.flatnonzero(done == 0).tolist()[:10]} were not written")
        n_tokens = int(train["loss_mask"][order].sum())
        size = sum(store_bytes(os.path.join(out, a)) for a in names)
        attrs = dict(attrs, complete=True, response_tokens=n_tokens, store_bytes=store_bytes(out),
                     bytes_per_token=size / max(n_tokens, 1),
                     seconds=round(time.time() - t0, 1))
        write_attrs(out, attrs)
        log(f"teacher cache {out}: {m} rows, {n_tokens} response tokens, K={top_k}"
            + (f" + {samples} drawn" if samples else "") + (f", a tail of rank {rank}" if rank else "")
            + f", {attrs['bytes_per_token']:.0f} bytes a response token ({token_bytes(attrs)} uncompressed)"
            + (f" + the tail basis, {4 * rank * vocab / 2**20:.1f} MiB once" if rank else "") + ", "
            f"{time.time() - t0:.0f}s")
    barrier("teacher cache: complete")
    return read_attrs(out)
