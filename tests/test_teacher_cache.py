"""The teacher cache (kdjax.training.teacher_cache, `kdjax teacher-cache`): the store holds the
teacher's own top-K log-probs and tail mass (checked against the model's full logits in float64);
drawn tokens estimate the teacher and the forward-KL gradient without bias; SIGKILL + rerun and 2
processes give the arrays of one uninterrupted process; a half-written chunk is never read; a cache
of another run is refused naming the field before any model loads; KD from K = 8 plus a full-rank
low-rank tail is KD from the teacher; verify's table; a study builds
one cache and trains every run from it."""
import json
import os
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import kdjax
from kdjax import data, gguf_io, losses, train_config
from kdjax.config import ModelConfig
from kdjax.errors import ConfigError
from kdjax.training import distill, models, study, teacher_cache
from kdjax.training.cache_verify import verify
from helpers import ROOT, launch, set_fields

V = 300


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    _, _, tok = gguf_io.read_gguf(gguf_io.preset_path("smollm2-135m-instruct"))
    cfg = ModelConfig.preset("tiny-llama", vocab_size=V, num_layers=4, max_position_embeddings=128)
    kdjax.save(kdjax.Qwen2(cfg, seed=1), str(root / "teacher"), format="kdjax", tokenizer=tok)
    data.save_records([data.Record(prompt=f"f{i}", response=f"g{i} h{i}") for i in range(40)], str(root / "p.jsonl"))
    return root


def fields(setup, out="unused", **kw) -> dict:
    """32 training rows; 2 steps of 8 read 16 of them; a K = 8 bf16 store with a rank-4 tail packed in
    3 bytes a token, in chunks of 3 rows."""
    f = {"teacher": str(setup / "teacher"), "student_layers": "every_other", "out_dir": str(out),
         "data.source": str(setup / "p.jsonl"), "data.layout": "records", "data.template": "plain",
         "data.max_length": 32, "data.valid": 4, "data.test": 4, "train.batch_size": 8, "train.steps": 2,
         "train.lr": 1e-2, "train.warmup_steps": 0, "train.log_every": 1, "train.eval_every": 0,
         "kd.chunk_size": 48, "eval.num_samples": 0, "baseline": False, "cache.top_k": 8, "cache.chunk_rows": 3,
         "cache.tail_rank": 4, "cache.tail_bytes": 3}
    f.update(kw)
    return f


def config(setup, out="unused", **kw):
    c = set_fields(train_config.get_config(), **fields(setup, out, **kw))
    c.mode = "distill"
    return c


def arrays(path) -> dict:
    """Every array of a store, bf16 as its bits (exact comparison)."""
    out = {}
    for name, a in teacher_cache.open_arrays(str(path), teacher_cache.read_attrs(str(path))).items():
        x = a.read().result()
        out[name] = x.view(np.uint16) if x.dtype == ml_dtypes.bfloat16 else x
    return out


def assert_same_arrays(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def store(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("store") / "cache"
    teacher_cache.build(config(setup), str(out))
    return out


@pytest.fixture(scope="module")
def tail_store(setup, tmp_path_factory):
    """K = 8 and a tail of the teacher's full rank (its hidden size, 64), float32: the tail's logits
    are the teacher's own, so this cache loses nothing either."""
    out = tmp_path_factory.mktemp("tail") / "cache"
    teacher_cache.build(config(setup, **{"cache.dtype": "float32", "cache.chunk_rows": 8, "cache.tail_rank": 64,
                                         "cache.tail_bytes": 0}),
                        str(out))
    return out


def np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_store_holds_the_teachers_top_k_and_tail(setup, store):
    attrs = teacher_cache.read_attrs(str(store))
    c = config(setup)
    teacher, tok = kdjax.load(c.teacher)
    rows = distill.make_rows(c.data, distill.load_splits(c.data), tok)["train"]
    order = teacher_cache.rows_read(c, 32)
    assert attrs["complete"] and attrs["top_k"] == 8 and attrs["dtype"] == "bfloat16" and attrs["vocab_size"] == V
    assert attrs["cached_rows"] == len(order) == 16 and attrs["rows_sha256"] == teacher_cache.rows_sha256(rows)
    got = arrays(store)
    np.testing.assert_array_equal(got["rows"], order)
    assert list(order[:8]) == list(data.batch_indices(32, 0, batch_size=8, seed=0))  # first read, first stored
    logits = np.asarray(teacher(jnp.asarray(rows["input_ids"][order])), np.float64)  # the model's own full logits
    t_logp = np_log_softmax(logits[..., :V])
    mask = rows["loss_mask"][order] > 0
    ids, logp = got["ids"][mask], got["logp"].view(ml_dtypes.bfloat16).astype(np.float64)[mask]
    ref = t_logp[mask]
    ninth = np.sort(ref, -1)[:, -9]
    picked = np.take_along_axis(ref, ids, -1)
    assert np.all(picked >= ninth[:, None] - 1e-5)  # the 8 most likely (up to float noise at a tie)
    assert all(len(set(i)) == 8 for i in ids)
    np.testing.assert_allclose(logp, picked, rtol=2 ** -7, atol=1e-6)  # bf16 of the teacher's log-probs
    rest = 1 - np.exp(picked).sum(-1)
    np.testing.assert_allclose(np.exp(got["log_rest"][mask]), rest, rtol=1e-4)
    assert not got["ids"][~mask].any() and not got["logp"][~mask].any() and not got["log_rest"][~mask].any()
    assert not got["tail_coef"][~mask].any()
    assert 0 < attrs["bytes_per_token"] < (4 + 2) * 8 + 4 + 3 + 40  # zstd; padding and prompts cost little
    # the tail: coef = hidden @ encoder (fp32), coef @ basis the best rank-4 fit of the logits on the first rows,
    # each token's 4 coefficients in 24 bits
    h = np.asarray(teacher.hidden_states(jnp.asarray(rows["input_ids"][order])), np.float64)[mask]
    enc, basis = got["tail_encoder"].astype(np.float64), got["tail_basis"].astype(np.float64)
    assert enc.shape == (64, 4) and basis.shape == (4, V) and got["tail_coef"].shape[-1] == 3
    bits, step, mean = got["tail_bits"], got["tail_step"].astype(np.float64), got["tail_mean"].astype(np.float64)
    coef = teacher_cache.decode_tail(got["tail_coef"], bits, step, mean).astype(np.float64)[mask]
    exact = h @ enc  # the fit's tokens: every row here is one of the first 128
    assert bits.sum() == 24 and np.all(bits >= 1) and attrs["tail_dims"] == 4
    assert np.all(np.diff(bits[np.argsort(exact.std(0))]) >= 0)  # more bits where the coefficient varies more
    inside = np.abs(exact - mean) < step * 2.0 ** (bits - 1)  # not clipped
    assert inside.mean() > 0.9
    np.testing.assert_array_less(np.abs(coef - exact)[inside], (step / 2 + 1e-2 * np.abs(exact).max())[None].repeat(
        len(exact), 0)[inside])
    fit = h[:len(h) // 2]  # logits' squared error: the fitted rank 4 beats any other 4 directions of the head
    w = np.asarray(teacher.head_kernel(), np.float64)[:, :V]
    err = lambda a, b: np.sum((fit @ a @ b - fit @ w) ** 2)
    u, _, vt = np.linalg.svd(w, full_matrices=False)
    assert err(enc, basis) < err(u[:, :4], u[:, :4].T @ w)


def test_a_packed_tail_code_is_laid_out_bit_by_bit():
    """Two directions, 3 and 2 bits, steps 1 and 2 around 0: 1.2 -> code 1 + 4 = 0b101, -3.0 -> -2 + 2
    = 0b00, little-endian one after the other: the byte 5; decoded to the middles of their intervals;
    beyond the range, the outermost code."""
    code = dict(bits=np.array([3, 2]), step=np.array([1.0, 2.0]), mean=np.zeros(2))
    packed = teacher_cache.encode_tail(np.array([[1.2, -3.0], [99.0, -99.0]]), **code)
    assert packed.dtype == np.uint8 and packed.tolist() == [[5], [7 + 8 * 0]]
    np.testing.assert_array_equal(teacher_cache.decode_tail(packed, **code), [[1.5, -3.0], [3.5, -3.0]])
    wide = dict(bits=np.array([16, 5, 1]), step=np.array([0.5, 1.0, 3.0]), mean=np.array([10.0, 0.0, -1.0]))
    x = np.random.default_rng(0).normal([10, 0, -1], [300, 3, 2], (1000, 3))
    packed = teacher_cache.encode_tail(x.reshape(10, 100, 3), **wide)
    assert packed.shape == (10, 100, 3)  # 22 bits: 3 bytes
    back = teacher_cache.decode_tail(packed, **wide).reshape(-1, 3)
    assert np.abs(back[:, 0] - x[:, 0]).max() <= 0.25 + 1e-3  # 16 bits: never clipped here
    assert len(np.unique(back[:, 1])) <= 32 and sorted(np.unique(back[:, 2])) == [-2.5, 0.5]


def test_the_tail_code_spends_its_bits_where_the_coefficients_vary_and_quantizes_as_max_did():
    """Water-filling over 24 directions of geometric spread in 16 bytes: the budget used, more bits to
    the wider directions (each bit halving its quantization step), and each direction's error that of Max's (1960) optimal uniform quantizer
    of a Gaussian with 2^b levels (his table: 0.3634, 0.1188, 0.03744, 0.01154, 0.003490 of the
    variance for b = 1 .. 5), checked in float64 on 200,000 draws."""
    rng = np.random.default_rng(1)
    std = 50.0 * 0.6 ** np.arange(24)
    coef = rng.normal(3.0, std, (200_000, 24))
    code = teacher_cache.plan_tail(coef, 16)
    bits = code["bits"]
    assert 120 <= bits.sum() <= 128 and np.all(np.diff(bits) <= 0) and bits[-1] == 0 and bits[0] > 5
    kept = bits > 0
    got = teacher_cache.decode_tail(teacher_cache.encode_tail(coef[:, kept], **{k: v[kept] for k, v in code.items()}),
                                    **{k: v[kept] for k, v in code.items()}).astype(np.float64)
    mse = ((got - coef[:, kept]) ** 2).mean(0) / std[kept] ** 2
    max_1960 = {1: 0.3634, 2: 0.1188, 3: 0.03744, 4: 0.01154, 5: 0.003490}
    for b, m in zip(bits[kept], mse):
        if b in max_1960:
            assert abs(m / max_1960[b] - 1) < 0.05, (b, m)
    level = std[kept] / 2.0 ** bits[kept]  # water-filling: the same level to within the rounding of a bit,
    assert level.max() / level.min() <= 2 + 1e-9 and std[~kept].max() <= 2 * level.min()  # nothing wider dropped


def test_drawn_tokens_estimate_the_teacher_and_the_forward_kl_gradient_without_bias():
    rng = np.random.default_rng(0)
    v, k, s, draws = 40, 4, 16, 300
    t_logp = jax.nn.log_softmax(jnp.asarray(rng.standard_normal((2, v)) * 1.5, jnp.float32))
    ids, logp, rest = losses.top_k_teacher(t_logp, k)
    zs = jnp.asarray(rng.standard_normal((1, 2, v)), jnp.float32)
    grad = jax.jit(jax.grad(lambda z, i, lp, lt: losses.sparse_distill_loss(z, i, lp, lt, jnp.zeros((1, 2), int))[0]))
    p_hat, g_hat = np.zeros((2, v)), np.zeros((1, 2, v))
    for d in range(draws):
        drawn = teacher_cache.draw(jax.random.PRNGKey(d), t_logp, ids, s)
        assert all(not set(np.asarray(drawn)[j]) & set(np.asarray(ids)[j]) for j in range(2))  # outside the top K
        all_ids, all_logp, tail = teacher_cache.pack_tokens(np.concatenate([ids, drawn], -1), np.asarray(logp),
                                                            np.asarray(rest), np.ones(2), k, s, np.float32)
        real = all_ids >= 0
        assert all(len(set(i[r])) == r.sum() for i, r in zip(all_ids, real))  # each id once
        np.testing.assert_allclose((np.exp(all_logp) * real).sum(-1), 1.0, rtol=1e-5)  # top K + the tail's share
        for j in range(2):
            np.add.at(p_hat[j], all_ids[j][real[j]], np.exp(all_logp[j][real[j]]))
        g_hat += np.asarray(grad(zs, all_ids[None], all_logp[None], np.full((1, 2), teacher_cache.NO_TAIL)))
    p = np.exp(np.asarray(t_logp, np.float64))
    sigma = np.sqrt(p * (1 - p) / (s * draws))  # a drawn token's count is binomial (an upper bound on the top K's)
    assert np.all(np.abs(p_hat / draws - p) <= 5 * sigma + 1e-6)
    # forward KL's gradient is (q - p) / tokens, linear in the teacher: the mean over draws is the dense one
    dense = np.asarray(jax.grad(lambda z: losses.forward_kl(z, jnp.log(jnp.asarray(p, jnp.float32))[None]))(zs))
    assert np.all(np.abs(g_hat / draws - dense) <= 5 * sigma[None] / 2 + 1e-6)


def test_sigkill_then_rerun_gives_the_arrays_of_an_uninterrupted_build(setup, store, tmp_path):
    out = tmp_path / "cache"
    cmd = [sys.executable, "-m", "kdjax", "teacher-cache", f"--out={out}",
           *[f"--config.{k}={v}" for k, v in fields(setup).items()]]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        if line.startswith("teacher cache: chunk 2/"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    done = arrays(out)["done"]
    assert 2 <= done.sum() < len(done), done  # killed part way
    rerun = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "written earlier, continuing" in rerun.stdout
    assert_same_arrays(arrays(out), arrays(store))
    said = []
    teacher_cache.build(config(setup), str(out), log=said.append)  # complete: nothing to do
    assert said == [f"teacher cache {out}: complete (16 rows, {teacher_cache.read_attrs(str(out))['bytes_per_token']:.0f} "
                    f"bytes a response token)"]


def test_a_half_written_chunk_is_never_read_and_a_rerun_makes_it_whole(setup, store, tmp_path):
    out = tmp_path / "cache"
    shutil.copytree(store, out)
    a = teacher_cache.open_arrays(str(out), teacher_cache.read_attrs(str(out)))
    a["done"][2].write(np.uint8(0)).result()  # as a kill between the rows and the mark leaves it
    a["ids"][6:9].write(np.full((3, 32, 8), 7, np.int32)).result()
    with pytest.raises(teacher_cache.CacheError, match=r"incomplete teacher cache \(5 of 6 chunks"):
        teacher_cache.TeacherCache(str(out))
    with pytest.raises(teacher_cache.CacheError, match="incomplete"):
        distill.train(config(setup, tmp_path / "run", **{"kd.teacher_cache": str(out)}))
    teacher_cache.build(config(setup), str(out))
    assert_same_arrays(arrays(out), arrays(store))


WORKER = r"""
import json, os, sys
pid, n, fields, out = int(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(os.environ["COORDINATOR"], num_processes=n, process_id=pid)
from kdjax import train_config
from kdjax.training import teacher_cache
sys.path.insert(0, "tests")
from helpers import set_fields
c = set_fields(train_config.get_config(), **fields)
c.mode = "distill"
teacher_cache.build(c, out)
"""


def test_two_processes_write_the_store_one_process_writes(setup, store, tmp_path):
    outs = launch(WORKER, 2, json.dumps(fields(setup)), str(tmp_path / "cache"))
    chunks = [[int(line.split()[3].split("/")[0]) for line in out.splitlines() if line.startswith("teacher cache: chunk")]
              for out in outs]
    assert chunks == [[1, 3, 5], [2, 4, 6]]  # each process its own rows
    assert_same_arrays(arrays(tmp_path / "cache"), arrays(store))


def test_a_cache_of_another_run_is_refused_naming_the_field_before_any_model_loads(setup, store, tmp_path,
                                                                                monkeypatch):
    def no_model(*a, **k):
        raise AssertionError("a model was loaded")
    monkeypatch.setattr(models, "load", no_model)
    other = tmp_path / "other"
    shutil.copytree(store, other)
    attrs = teacher_cache.read_attrs(str(other))
    teacher_cache.write_attrs(str(other), dict(attrs, tokenizer_sha256="0" * 64))
    cases = [({"data.max_length": 24}, str(store), r"kd.teacher_cache=.*built with data.max_length=32, this run has "
                                                   r"data.max_length=24"),
             ({"data.packing": True}, str(store), "data.packing=False"),
             ({"kd.temperature": 2.0}, str(store), "kd.temperature=1.0"),
             ({"data.limit": 39}, str(store), r"training rows differ from this run's \(data.limit=0 -> 39\)"),
             ({"train.seed": 5}, str(store), r"not the \d+ more that train.steps=2 batches of 8 with train.seed=5"),
             ({}, str(other), "another tokenizer"),
             ({}, str(tmp_path / "none"), "no teacher cache here")]
    for change, path, match in cases:
        with pytest.raises((ConfigError, teacher_cache.CacheError), match=match):
            distill.train(config(setup, tmp_path / "run", **{"kd.teacher_cache": path, **change}))
    teacher_cache.write_attrs(str(other), dict(attrs, teacher_sha256="0" * 64))
    with pytest.raises(ConfigError, match="built from another teacher"):
        distill.train(config(setup, tmp_path / "run", **{"kd.teacher_cache": str(other)}))
    with pytest.raises(ConfigError, match="cache.dtype='int8'"):
        distill.check_config(config(setup, **{"cache.dtype": "int8"}))
    with pytest.raises(teacher_cache.CacheError, match="holds a teacher cache of another run: it was built with "
                                                       "cache.top_k=8, this run has cache.top_k=4"):
        shutil.copytree(store, tmp_path / "partial")
        teacher_cache.open_arrays(str(tmp_path / "partial"), attrs)["done"][0].write(np.uint8(0)).result()
        teacher_cache.write_attrs(str(tmp_path / "partial"), dict(attrs, complete=False))
        teacher_cache.build(config(setup, **{"cache.top_k": 4}), str(tmp_path / "partial"))
    monkeypatch.undo()
    cli = subprocess.run([sys.executable, "-m", "kdjax", "distill", f"--config.kd.teacher_cache={store}",
                          "--config.kd.hidden_weight=0",  # the default job's layer-state term: not from a cache
                          "--config.data.max_length=24", *[f"--config.{k}={v}" for k, v in
                                                           fields(setup, tmp_path / "cli").items()
                                                           if k != "data.max_length"]],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert cli.returncode == 2 and len(cli.stderr.strip().splitlines()) == 1, cli.stderr[-2000:]
    assert "data.max_length=24" in cli.stderr


def test_kd_from_a_cache_with_a_full_rank_tail_is_kd_from_the_teacher(setup, tail_store, tmp_path, monkeypatch):
    """K = 8 with a full-rank tail, float32: the same losses, step by step, and the same student, on a
    2 x 2 x 2 mesh; the cached run loads no teacher (its student is a checkpoint). (K = V with one tail
    bucket is the dense loss too: tests/test_losses.py.)"""
    teacher, tok = kdjax.load(str(setup / "teacher"))
    kdjax.save(models.student_from_teacher(teacher, [0, 2]), str(tmp_path / "student0"), format="kdjax", tokenizer=tok)
    mesh = {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2, "student": str(tmp_path / "student0")}
    online = distill.train(config(setup, tmp_path / "online", **mesh))

    def no_teacher(*a, **k):
        raise AssertionError("the cached run loaded the teacher")
    monkeypatch.setattr(distill, "load_frozen", no_teacher)
    cached = distill.train(config(setup, tmp_path / "cached", **mesh, **{"kd.teacher_cache": str(tail_store)}))
    assert cached["teacher"] is None
    rows = lambda out: [json.loads(line) for line in open(out / "metrics.jsonl")]
    a, b = rows(tmp_path / "online"), rows(tmp_path / "cached")
    for key in ("loss", "kd_loss", "ce_loss", "grad_norm"):
        np.testing.assert_allclose([r[key] for r in b], [r[key] for r in a], rtol=2e-5, err_msg=key)
    pa, pb = (jax.tree.leaves(jax.tree.map(np.asarray, nnx_state(r["student"]))) for r in (online, cached))
    # Adam divides each gradient by its own size, so where a gradient is near zero the rounding of two
    # float32 computations can move a weight by a visible share of a step (one weight in 19,200 by
    # 4e-5 on one CPU): nearly all within 0.2% of a step at lr 1e-2, none by a tenth of one.
    for x, y in zip(pa, pb):
        off = np.abs(y - x) > 2e-5 + 1e-5 * np.abs(x)
        assert off.mean() < 1e-3 and np.abs(y - x).max() < 1e-3, (off.sum(), off.size, np.abs(y - x).max())


def nnx_state(model):
    from flax import nnx
    return nnx.to_pure_dict(nnx.state(model))


def test_verify_measures_what_each_k_loses(tail_store):
    """A full-rank tail completes the cache into the teacher (KL 0, the dense loss and gradient) where
    spreading the tail evenly loses something; the table and a K the store lacks."""
    got = verify(str(tail_store), rows=4, sizes=(4, 8), log=lambda m: None)
    assert [r["k"] for r in got["rows"]] == [4, 8]
    for r in got["rows"]:
        assert abs(r["kl"]) < 1e-5 and r["kl_even"] > 1e-3 and r["tail"] > 1e-2, r
        assert r["grad_rel_err"] < 1e-4 and r["grad_cos"] > 1 - 1e-6, r
        assert abs(r["sparse"] - r["dense"]) < 1e-5 * abs(r["dense"]), r
    assert got["rows"][0]["kl_even"] > got["rows"][1]["kl_even"]  # K = 4 spreads more mass than K = 8
    assert got["rows"][1]["bytes"] == (4 + 4) * 8 + 4 + 4 * 64  # int32 ids + float32 log-probs, the tail, 64 coefs
    assert "| top 8 | 324 |" in got["table"] and "float32" in got["table"] and "rank 64" in got["table"]
    with pytest.raises(teacher_cache.CacheError, match="--k=8,9: .* holds the top 8"):
        verify(str(tail_store), rows=4, sizes=(8, 9), log=lambda m: None)


def test_a_study_builds_one_cache_from_the_fine_tuned_teacher_and_trains_every_run_from_it(setup, tmp_path,
                                                                                            capsys, monkeypatch):
    out = tmp_path / "study"
    opened, open_for = [], teacher_cache.open_for
    monkeypatch.setattr(teacher_cache, "open_for", lambda cfg, *a: opened.append(cfg.kd.teacher_cache) or
                        open_for(cfg, *a))
    c = config(setup, out, **{"kd.teacher_cache": str(out / "cache"), "teacher_sft.steps": 1,
                              "eval.num_samples": 1, "eval.max_new_tokens": 2, "mesh.num_devices": 1})
    study.run_study(c, {"train.lr": [1e-2, 3e-3]}, [0])
    printed = capsys.readouterr().out
    assert printed.count("teacher cache: chunk 1/") == 1  # built once, before the first run
    assert opened == [str(out / "cache")] * 2  # then read by every run
    attrs = teacher_cache.read_attrs(str(out / "cache"))
    assert attrs["teacher"] == str(out / "teacher-0" / "sft")  # of the teacher the students learn from
    assert attrs["cached_rows"] == 32  # every training row: each seed's order finds its rows
    runs = json.load(open(out / "study.json"))["runs"]
    first = {(r["cell"]["train.lr"], r["seed"]): [json.loads(line)["loss"] for line in
                                                   open(os.path.join(r["out_dir"], "metrics.jsonl"))] for r in runs}
    assert first[1e-2, 0][0] == pytest.approx(first[3e-3, 0][0], rel=1e-6)  # one start, one cache
    assert first[1e-2, 0][1] != pytest.approx(first[3e-3, 0][1], rel=1e-4)  # then the lr shows
    table = (out / "study.md").read_text()
    assert table.count("| train.lr=") == 2 and f"teacher cache {out / 'cache'}" in table and "built in" in table
