"""Quantization-aware distillation: the fake-quantized forward is the int4 model's bit for bit, its
straight-through gradient is the float64 numpy one, QAD lowers the int4 model's divergence to the
float teacher below GPTQ's on held-out rows, its export loads in transformers + gptqmodel, and a
killed run resumes bit-identical."""
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kdjax
from kdjax import checkpoint, data, gguf_io, losses, train_config
from kdjax.config import ModelConfig
from kdjax.errors import ConfigError, UserError
from kdjax.quant import fake_quant, grid
from kdjax.quant.aqt_pass import to_int4_model
from kdjax.quant.export_gptq import load_gptq, read_gptq
from kdjax.quant.quantize import quantize_model
from kdjax.training import distill, qad
from kdjax.training.run import run
from helpers import run_kdjax, set_fields, sigkill_at
from test_quant_common import logits, tiny_gptq
from test_quant_export import HAS_GPTQ_LOADER, gptqmodel_logits, rel_err, restore_environ  # noqa: F401 (a fixture)


# ---- one layer: forward and gradient against float64 numpy -------------------------------------
def numpy_reference(u, scale, zero, g_idx, x, c, bits=4):
    """W_q and the straight-through gradients of sum(c * (x @ W_q)) in float64, from the definitions:
    codes = clip(round(u) + z), W_q = s * (codes - z), du = G * s * inside,
    dscale = sum_group G * (codes - z), dzero = sum_group -G * s * (1 - inside)."""
    maxq = 2 ** bits - 1
    s16 = scale.astype(np.float16).astype(np.float64)
    z = np.clip(np.round(zero.astype(np.float64)), 0, maxq)
    s, zr = s16[g_idx], z[g_idx]
    v = np.round(u.astype(np.float64)) + zr
    inside = (v >= 0) & (v <= maxq)
    q = np.clip(v, 0, maxq)
    g = x.astype(np.float64).T @ c.astype(np.float64)  # dLoss / dW_q
    dscale, dzero = np.zeros(scale.shape), np.zeros(zero.shape)
    np.add.at(dscale, g_idx, g * (q - zr))
    np.add.at(dzero, g_idx, -g * s * (1 - inside))
    return s * (q - zr), q, g * s * inside, dscale, dzero


def test_straight_through_gradient_matches_float64_numpy():
    rng = np.random.default_rng(7)
    n_in, n_out, gs = 24, 6, 8
    start = grid.rtn(rng.standard_normal((n_in, n_out)).astype(np.float32) * 0.1, group_size=gs, sym=False)
    perm = rng.permutation(n_in)  # act-order: a group's rows scattered over the input dim
    g_idx = start.g_idx[perm]
    # grid coordinates off the start's codes, some far enough out that their codes clip (inside = 0)
    u = (start.codes[perm].astype(np.float32) - start.zeros[g_idx] + rng.standard_normal((n_in, n_out)) * 3
         ).astype(np.float32)
    scale = start.scales.astype(np.float32) * (1 + 0.01 * rng.standard_normal(start.scales.shape)).astype(np.float32)
    zero = (start.zeros + rng.uniform(-0.4, 0.4, start.zeros.shape)).astype(np.float32)
    x = rng.standard_normal((5, n_in)).astype(np.float32)
    c = rng.standard_normal((5, n_out)).astype(np.float32)
    wq_ref, q_ref, du_ref, ds_ref, dz_ref = numpy_reference(u, scale, zero, g_idx, x, c)
    assert 0.05 < (du_ref == 0).mean() < 0.5  # both branches of the clipped straight-through gradient

    def loss(u, scale, zero):
        wq = fake_quant.fake_quantize(u, scale, zero, jnp.asarray(g_idx), bits=4)
        return jnp.sum(c * (x @ wq)), wq

    (_, wq), (du, ds, dz) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(u, scale, zero)
    np.testing.assert_array_equal(np.asarray(wq), wq_ref.astype(np.float32))  # exact in float32
    np.testing.assert_allclose(np.asarray(du), du_ref, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(ds), ds_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(dz), dz_ref, rtol=1e-5, atol=1e-7)
    # the int4 layer it stands for: the same weights, bit for bit
    tree = lambda a: fake_quant.linear_tree({"layers.0.mlp.up_proj": a})
    qm = fake_quant.quantized_model(tree(u), tree(scale), tree(zero), tree(g_idx), bits=4, group_size=gs, sym=False,
                                    desc_act=True)
    ql = qm.linears["layers.0.mlp.up_proj"]
    np.testing.assert_array_equal(ql.codes, q_ref.astype(np.uint8))
    np.testing.assert_array_equal(ql.dequantize(), np.asarray(wq))


# ---- a whole model: the fake-quantized forward is the int4 model's ---------------------------------
@pytest.mark.parametrize("case", ["gptq_act_order", "rtn_asym"])
def test_fake_quantized_forward_is_the_int4_models_bit_for_bit(case):
    model, ids, gptq = tiny_gptq()
    qm = gptq if case == "gptq_act_order" else quantize_model(model, method="rtn", group_size=32, sym=False)
    graphdef, state = nnx.split(model)
    latent = nnx.to_pure_dict(state)
    kernels = {p: latent["layers"][int(p.split(".")[1])][p.split(".")[2]][p.split(".")[3]]["kernel"] for p in qm.linears}
    trees = fake_quant.grid_trees(qm, kernels)
    # the weights as one program, the forward as another: inside one program XLA may fuse the
    # dequantization into the matmul and sum in another order (last-bit differences in the logits)
    weights = jax.jit(lambda u: fake_quant.quantized_params(latent, u, trees["scale"], trees["zero"], trees["g_idx"]))
    forward = lambda u: logits(nnx.merge(graphdef, weights(u)), ids)
    # step 0: the grid coordinates of the float weights give the start's int4 model
    np.testing.assert_array_equal(np.asarray(forward(trees["u"])), np.asarray(logits(to_int4_model(model, qm), ids)))
    # grid coordinates that moved: other codes, and still the int4 model they export to
    rng = np.random.default_rng(3)
    moved = jax.tree.map(lambda u: u + rng.standard_normal(u.shape).astype(np.float32), trees["u"])
    exported = fake_quant.quantized_model(moved, trees["scale"], trees["zero"], trees["g_idx"], bits=4,
                                          group_size=32, sym=qm.sym, desc_act=qm.desc_act)
    assert sum(int((exported.linears[p].codes != q.codes).sum()) for p, q in qm.linears.items()) > 1000
    np.testing.assert_array_equal(np.asarray(forward(moved)), np.asarray(logits(to_int4_model(model, exported), ids)))


# ---- QAD runs on a tiny model ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny Llama with SmolLM2's tokenizer, its weights scaled up from the 0.02-std init so that
    its outputs are peaked and int4 rounding shows in them; stdlib docstring -> code pairs."""
    root = tmp_path_factory.mktemp("qad")
    _, _, tok = gguf_io.read_gguf(gguf_io.preset_path("smollm2-135m-instruct"))
    model = kdjax.Qwen2(ModelConfig.preset("tiny-llama", vocab_size=49152, num_layers=2, max_position_embeddings=256),
                        seed=1)
    for path, var in nnx.to_flat_state(nnx.state(model)):
        if path[-1] in ("embedding", "kernel"):
            var.set_value(var[...] * (25.0 if path[-1] == "embedding" else 5.0))
    kdjax.save(model, str(root / "model"), format="kdjax", tokenizer=tok)
    data.save_records(data.python_function_records(limit=80), str(root / "pairs.jsonl"))
    return root


def config(setup, out, mode="qad", **kw):
    c = train_config.get_config()
    c.mode, c.teacher, c.out_dir = mode, str(setup / "model"), str(out)
    c.data.source, c.data.layout = str(setup / "pairs.jsonl"), "records"
    c.data.max_length, c.data.valid, c.data.test = 64, 4, 8
    c.train.steps, c.train.batch_size, c.train.lr, c.train.warmup_steps, c.train.weight_decay = 8, 8, 0.02, 0, 0.0
    c.quant.train_weights = c.quant.train_scales = True  # the tests' QAD trains both
    c.train.log_every, c.train.eval_every, c.train.checkpoint_every = 1, 0, 4
    c.kd.chunk_size, c.eval.num_samples, c.baseline = 96, 0, False
    c.quant.group_size, c.quant.calib_samples, c.quant.calib_length = 32, 8, 64
    c.mesh.num_devices = 1
    return set_fields(c, **kw)


QAD_GRID = {"quant.sym": False}  # `kdjax qad`'s grid: a zero point per group


@pytest.fixture(scope="module")
def trained(setup, tmp_path_factory):
    """`kdjax qad` (training, then its report) on its default grid: (out_dir, what qad.train returned)."""
    out, results = tmp_path_factory.mktemp("qad_run"), []
    real_train = qad.train
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(qad, "train", lambda cfg, **kw: results.append(real_train(cfg, **kw)) or results[-1])
        run(config(setup, out, **QAD_GRID, **{"eval.num_samples": 2, "eval.max_new_tokens": 4}), "qad")
    return out, results[0]


def held_out_rows(result):
    ex = data.tokenize(result["splits"]["test"], result["tokenizer"], max_length=64, template="minillm",
                       on_long_prompt="skip")
    rows = data.pack(ex, 64, pad_id=data.pad_id(result["tokenizer"]))
    return jnp.asarray(rows["input_ids"]), jnp.asarray(rows["loss_mask"]) > 0


def test_qad_lowers_the_int4_divergence_below_gptq_on_held_out_rows(setup, trained):
    out, result = trained
    ids, mask = held_out_rows(result)
    teacher = logits(kdjax.load(str(setup / "model"))[0], ids)
    start, start_qm = load_gptq(str(out / qad.START))  # GPTQ with act-order: what QAD started from
    after, qm = load_gptq(str(out / qad.INT4))
    kl_gptq = float(losses.forward_kl(logits(start, ids), teacher, mask))
    kl_qad = float(losses.forward_kl(logits(after, ids), teacher, mask))
    assert kl_qad < 0.85 * kl_gptq, (kl_qad, kl_gptq)  # 0.74 x measured
    assert qm.method == "qad" and qm.desc_act and qm.group_size == 32
    changed = sum(int((q.codes != start_qm.linears[p].codes).sum()) for p, q in qm.linears.items())
    assert changed > 0  # the codes moved
    assert not qm.sym and not start_qm.sym  # the asymmetric grid from start to end
    # the checkpoint holds what the run returned
    np.testing.assert_array_equal(np.asarray(logits(after, ids)), np.asarray(logits(result["student"], ids)))


def test_qad_report_has_float_rtn_gptq_and_qad_rows(trained):
    out, _ = trained
    rep = json.load(open(out / "report.json"))["results"]
    assert list(rep) == ["float model (teacher)", "int4 rtn", "int4 gptq (the start)", "int4 after QAD"]
    assert all(r["loss"] > 0 and "rougeL" in r and "retention" in r for r in rep.values())
    sizes = [r["size_bytes"] for r in rep.values()]
    assert sizes[1] == sizes[2] == sizes[3] < sizes[0]
    assert "size MiB" in open(out / "report.md").read() and os.path.exists(out / "curves.png")


@pytest.mark.skipif(not HAS_GPTQ_LOADER, reason="gptqmodel + optimum not installed (optimum==2.3.0, gptqmodel==7.6.0)")
def test_qad_result_exports_and_loads_in_transformers_gptqmodel(trained, tmp_path, restore_environ):
    out, result = trained
    exported = tmp_path / "exported"
    proc = run_kdjax("export", "--format=gptq", f"--model={out / qad.INT4}", f"--out={exported}", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = read_gptq(str(out / qad.INT4))[1], read_gptq(str(exported))[1]
    assert b.method == a.method and b.desc_act and sorted(b.linears) == sorted(a.linears)
    for path, q in a.linears.items():  # re-packed unchanged
        for field in ("codes", "zeros", "scales", "g_idx"):
            np.testing.assert_array_equal(getattr(b.linears[path], field), getattr(q, field), err_msg=path)
    ids, _ = held_out_rows(result)
    ours = np.asarray(logits(load_gptq(str(out / qad.INT4))[0], ids))
    err = rel_err(gptqmodel_logits(str(exported), np.asarray(ids)), ours)
    assert err < 1e-2, err


KILLED_RUN = """
import pathlib, sys
sys.path.insert(0, "tests")
from test_qad import QAD_GRID, config
from kdjax.training import qad
qad.train(config(pathlib.Path(sys.argv[1]), sys.argv[2], **QAD_GRID))
"""


def test_a_sigkilled_qad_run_resumes_bit_identical(setup, trained, tmp_path):
    """SIGKILL in the middle of a QAD run (a child process running the `trained` fixture's config),
    then --resume: the int4 checkpoint equals the uninterrupted run's, tensor for tensor."""
    full, _ = trained
    # killed at step 6, after the step-4 checkpoint
    sigkill_at([sys.executable, "-u", "-c", KILLED_RUN, str(setup), str(tmp_path)], "step 6/8")
    assert not (tmp_path / qad.INT4).exists()  # it died mid-run
    qad.train(config(setup, tmp_path, resume=True, **QAD_GRID))
    steps = [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")]
    assert steps == list(range(1, 9))  # steps 5-6 of the killed run are not logged twice
    a = dict(checkpoint.read_safetensors(str(full / qad.INT4 / "model.safetensors")))
    b = dict(checkpoint.read_safetensors(str(tmp_path / qad.INT4 / "model.safetensors")))
    assert sorted(a) == sorted(b) and any(k.endswith(".qweight") for k in a)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_qad_config_errors(setup, tmp_path):
    for fields, match in [({"quant.start": "awq"}, r"--config.quant.start='awq': expected one of rtn, gptq"),
                          ({"quant.train_weights": False, "quant.train_scales": False, "quant.train_norms": False},
                           r"--config.quant.train_weights=False with"),
                          ({"quant.teacher": "big"}, r"--config.quant.teacher='big'"),
                          ({"train.select_best": "val_loss"}, r"QAD keeps its last step"),
                          ({"train.weight_decay": 0.01}, r"--config.train.weight_decay=0.01: QAD trains grid"),
                          ({"quant.bits": 3}, r"--config.quant.bits=3: GPTQ packing supports \(2, 4, 8\)"),
                          ({"quant.group_size": 0}, r"--config.quant.group_size=0: expected a positive size or -1"),
                          ({"quant.mse": -2.0}, r"--config.quant.mse=-2.0: expected -1 \(2.4 for GPTQ, 0 for RTN\)"),
                          ({"quant.float_dtype": "int8"}, r"--config.quant.float_dtype='int8': expected one of"),
                          ({"data.repack": True, "data.packing": True}, r"--config.data.repack=True: data.packing")]:
        with pytest.raises(ConfigError, match=match):
            qad.check_config(config(setup, tmp_path, **fields))
    with pytest.raises(UserError, match=r"--config.quant.group_size=48 does not divide .* use --config.quant.group_size=32"):
        qad.train(config(setup, tmp_path / "g", **{"quant.group_size": 48}))


def test_distill_with_qad_stage_reports_float_gptq_and_qad(setup, tmp_path):
    cfg = config(setup, tmp_path, mode="distill", student_layers="0", **{
        "train.steps": 2, "quant.aware": True, "quant.report": True, "quant.steps": 2, "quant.train_scales": False,
        "quant.train_weights": True,
        "eval.num_samples": 2, "eval.max_new_tokens": 4, "eval.before": False})
    run(cfg, "distill")
    rep = json.load(open(tmp_path / "report.json"))["results"]
    assert list(rep) == ["student after KD", "student after KD, int4 GPTQ", "student after KD, int4 after QAD"]
    float_size, gptq_size, qad_size = (rep[k]["size_bytes"] for k in rep)
    # as served: what the GPTQ checkpoint holds (float16 float tensors, packed int4), header aside
    checkpoint_bytes = os.path.getsize(tmp_path / "qad" / qad.INT4 / "model.safetensors")
    assert gptq_size == qad_size < float_size and abs(qad_size - checkpoint_bytes) < 0.01 * checkpoint_bytes
    assert all(rep[k]["loss"] > 0 and "rougeL" in rep[k] for k in rep)
    assert "size MiB" in open(tmp_path / "report.md").read()
    start, after = read_gptq(str(tmp_path / "qad" / qad.START))[1], read_gptq(str(tmp_path / "qad" / qad.INT4))[1]
    assert after.bits == 4 and after.method == "qad"
    for path, q in start.linears.items():  # quant.train_scales=False: the start's grid, frozen
        np.testing.assert_array_equal(after.linears[path].scales, q.scales, err_msg=path)
    assert os.path.exists(tmp_path / "qad" / "curves.png")


def test_qad_on_the_float_models_own_answers(setup, tmp_path):
    """kd.teacher_answers in QAD: the rows are the prompts with the float model's greedy answers (what a
    greedy Rouge-L scores), generated once for the rows the run reads, and the loss is on those answers;
    the run lays each step's rows end to end (data.repack), the reference below reads them one a row."""
    c = config(setup, tmp_path, **{"kd.teacher_answers": True, "kd.answer_tokens": 8, "train.steps": 2,
                                   "eval.batch_size": 16, "data.repack": True, "data.max_length": 128})
    out = qad.train(c)
    answers = {int(i): a for i, a in json.load(open(tmp_path / distill.ANSWERS))["answers"].items()}
    n = len(out["rows"]["train"]["input_ids"])
    assert set(answers) == {int(i) for s in range(2) for i in data.batch_indices(n, s, batch_size=8, seed=0)}
    examples = data.tokenize(out["splits"]["train"], out["tokenizer"], max_length=128, template=c.data.template,
                             on_long_prompt="skip")
    c.resume = True
    rows = distill.AnswerBatches(c, out["rows"]["train"], examples, out["tokenizer"], None,
                                 str(tmp_path / distill.ANSWERS))(0).arrays
    assert len(data.repack(rows)["input_ids"]) < len(rows["input_ids"])  # the run's step 0 had fewer rows
    first = json.loads(open(tmp_path / "metrics.jsonl").readline())
    ids, mask = jnp.asarray(rows["input_ids"]), jnp.asarray(rows["loss_mask"]) > 0
    assert int(mask.sum()) == sum(len(answers[int(i)]) for i in data.batch_indices(n, 0, batch_size=8, seed=0))
    # step 1's loss: the start's int4 model against the float model on step 0's answer rows
    start = load_gptq(str(tmp_path / qad.START))[0]
    want = float(losses.forward_kl(logits(start, ids), logits(kdjax.load(str(setup / "model"))[0], ids), mask))
    assert first["step"] == 1 and first["kd_loss"] == pytest.approx(want, rel=2e-3)
