"""The trainer: KD lowers the divergence, 1 device == 8 devices, SIGKILL + resume is bit-identical,
a diverging run stops and keeps its last good checkpoint."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kdjax
from kdjax import checkpoint, data, evaluate, gguf_io, train_config
from kdjax.training import distill, loop, models, rollout
from kdjax.training.run import run
from kdjax.config import ModelConfig
from kdjax.errors import ConfigError
from kdjax.sharding import make_mesh
from helpers import layer_states_error, set_fields, sigkill_at


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    _, _, tok = gguf_io.read_gguf(gguf_io.preset_path("smollm2-135m-instruct"))  # tensors stay unread
    cfg = ModelConfig.preset("tiny-llama", vocab_size=49152, num_layers=4, max_position_embeddings=256)
    kdjax.save(kdjax.Qwen2(cfg, seed=1), str(root / "teacher"), format="kdjax", tokenizer=tok)
    records = data.python_function_records(limit=80)
    data.save_records(records, str(root / "pairs.jsonl"))
    return root


def config(setup, out, **kw):
    c = train_config.get_config()
    c.teacher = str(setup / "teacher")
    c.student_layers = "every_other"
    c.out_dir = str(out)
    c.data.source, c.data.layout = str(setup / "pairs.jsonl"), "records"
    c.data.max_length, c.data.valid, c.data.test = 64, 8, 4
    c.train.steps, c.train.batch_size, c.train.lr, c.train.warmup_steps = 12, 8, 3e-3, 2
    c.train.log_every, c.train.eval_every, c.train.checkpoint_every = 1, 0, 4
    c.kd.chunk_size = 96
    c.eval.num_samples = 0
    c.baseline = False  # the tests that want the SFT baseline say so
    return set_fields(c, **kw)


def losses_of(out):
    rows = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    return np.array([r["kd_loss"] for r in rows if "kd_loss" in r])


def test_kd_lowers_divergence_and_one_device_equals_eight(setup, tmp_path):
    one = distill.train(config(setup, tmp_path / "one", **{"mesh.num_devices": 1, "train.eval_every": 6,
                                                         "eval.curve_samples": 2, "eval.max_new_tokens": 8}))
    eight = distill.train(config(setup, tmp_path / "eight", **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2,
                                                             "train.grad_accum": 2}))
    assert eight["mesh"].size == 8 and one["mesh"].size == 1
    a, b = losses_of(tmp_path / "one"), losses_of(tmp_path / "eight")
    assert len(a) == 12
    np.testing.assert_allclose(a, b, rtol=2e-4)
    assert a[-3:].mean() < 0.7 * a[:3].mean()  # the student moves toward the teacher
    evals = [json.loads(l) for l in open(tmp_path / "one" / "metrics.jsonl") if "val_loss" in l]
    assert [e["step"] for e in evals] == [6, 12] and all("rougeL" in e and e["val_loss"] > 0 for e in evals)


def test_student_from_teacher_copies_the_chosen_layers(setup):
    teacher, _ = kdjax.load(str(setup / "teacher"))
    assert models.parse_layers("every_other", 5) == [0, 2, 4]
    assert models.parse_layers("first_last:3", 6) == [0, 1, 5]
    student = models.student_from_teacher(teacher, [1, 3])
    assert student.config.num_layers == 2
    np.testing.assert_array_equal(student.layers[1].mlp.up_proj.kernel[...], teacher.layers[3].mlp.up_proj.kernel[...])
    np.testing.assert_array_equal(student.embed_tokens.embedding[...], teacher.embed_tokens.embedding[...])
    with pytest.raises(ValueError, match=r"student_layers='0,9'.*\[0, 4\)"):
        models.parse_layers("0,9", 4)


def test_bf16_compute_keeps_the_teacher_in_bf16_and_the_student_master_in_fp32(setup, tmp_path):
    c = config(setup, tmp_path, dtype="bfloat16", param_dtype="float32", remat=True)
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    teacher, tok = models.load_frozen(c.teacher, c, mesh)
    student = models.load_student(c, teacher, tok, mesh)
    t_leaves, s_leaves = jax.tree.leaves(nnx.state(teacher)), jax.tree.leaves(nnx.state(student))
    assert {x.dtype for x in t_leaves} == {jnp.dtype("bfloat16")} and not teacher.config.remat
    assert {x.dtype for x in s_leaves} == {jnp.dtype("float32")} and student.config.remat
    np.testing.assert_array_equal(student.layers[1].mlp.up_proj.kernel[...],  # layers 0, 2 of 4: every_other
                                  teacher.layers[2].mlp.up_proj.kernel[...].astype(jnp.float32))
    c.teacher_param_dtype = "float32"
    teacher, _ = models.load_frozen(c.teacher, c, mesh)
    assert {x.dtype for x in jax.tree.leaves(nnx.state(teacher))} == {jnp.dtype("float32")}


def test_the_report_puts_the_sft_baseline_beside_kd(setup, tmp_path):
    """issue 14: teacher SFT -> KD, and the same student fine-tuned alone on the same rows for the
    same steps, all in one report with the KD - SFT difference said plainly."""
    c = config(setup, tmp_path, **{"baseline": True, "teacher_sft.steps": 2, "train.steps": 3, "mesh.num_devices": 1,
                                   "eval.num_samples": 2, "eval.max_new_tokens": 4})
    run(c, "distill")
    rep = json.load(open(tmp_path / "report.json"))
    assert list(rep["results"]) == ["teacher", "teacher after SFT", "student before training",
                                    "student after SFT (baseline)", "student after KD"]
    assert rep["teacher"] == "teacher after SFT"  # retention against the teacher the student learnt from
    stages = rep["stages"]
    assert stages["teacher SFT"]["steps"] == 2 and stages["student after KD"]["steps"] == 3
    assert stages["student after SFT (baseline)"]["rows"] == stages["student after KD"]["rows"] == 3 * 8
    kd = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    sft = [json.loads(l) for l in open(tmp_path / "sft_baseline" / "metrics.jsonl")]
    assert [r["step"] for r in kd] == [r["step"] for r in sft] == [1, 2, 3]
    # the same starting weights on the same first rows: KD's data cross-entropy at step 1 is the baseline's
    assert kd[0]["ce_loss"] == pytest.approx(sft[0]["ce_loss"], rel=1e-6)
    verdict = rep["kd_vs_sft"]
    assert verdict["rougeL"] == pytest.approx(rep["results"]["student after KD"]["rougeL"]
                                              - rep["results"]["student after SFT (baseline)"]["rougeL"])
    assert verdict["text"] in (tmp_path / "report.md").read_text()


def test_hidden_state_kd_adds_the_layers_relative_error_and_trains_it_down(setup, tmp_path):
    """kd.hidden_weight: loss = KD + w x the mean over student layers of ||s - t||^2 / ||t||^2 (each
    student layer against the teacher layer it was made of), over every real token."""
    c = config(setup, "unused", **{"kd.hidden_weight": 0.7})
    teacher, tok = kdjax.load(str(setup / "teacher"))
    tparams = nnx.to_pure_dict(nnx.state(teacher))
    rows = distill.make_rows(c.data, distill.load_splits(c.data), tok)["train"]
    rows = {k: jnp.asarray(v[:4]) for k, v in rows.items() if k in data.ROW_KEYS}
    for spec in ("0,1", "every_other"):
        c.student_layers = spec
        student = models.student_from_teacher(teacher, models.parse_layers(spec, 4))
        graphdef, params = nnx.split(student)
        values = {}
        for w in (0.0, 0.7):
            c.kd.hidden_weight = w
            loss = distill.loss_of(c, student, teacher, make_mesh(1, 1, 1, devices=jax.devices()[:1]))
            values[w] = loss(nnx.to_pure_dict(params), rows, tparams, distill.token_totals(rows))
        ref = layer_states_error(student, teacher, rows, models.parse_layers(spec, 4))  # float64 numpy
        assert float(values[0.7][1]["hidden_loss"]) == pytest.approx(ref, rel=1e-4)
        assert float(values[0.7][0]) == pytest.approx(float(values[0.0][0]) + 0.7 * ref, rel=1e-5)
        assert (ref == 0.0) == (spec == "0,1")  # the teacher's first layers: the same states, nothing to learn
    curves = {}
    for w in (1e-9, 1.0):  # the metric of a run that (all but) ignores the term, and of one that learns it
        out = distill.train(config(setup, tmp_path / str(w), **{"kd.hidden_weight": w, "mesh.num_devices": 1}))
        curves[w] = [json.loads(l) for l in open(tmp_path / str(w) / "metrics.jsonl")]
    end = {w: np.mean([r["hidden_loss"] for r in rs][-3:]) for w, rs in curves.items()}
    assert end[1.0] < 0.8 * end[1e-9], end
    # on a 2 x 2 x 2 mesh (states sharded over the batch and the hidden width), the same run
    distill.train(config(setup, tmp_path / "mesh", **{"kd.hidden_weight": 1.0, "mesh.data": 2, "mesh.fsdp": 2,
                                                     "mesh.tensor": 2, "train.grad_accum": 2}))
    on_mesh = [json.loads(l) for l in open(tmp_path / "mesh" / "metrics.jsonl")]
    for key in ("loss", "hidden_loss"):
        np.testing.assert_allclose([r[key] for r in on_mesh], [r[key] for r in curves[1.0]], rtol=2e-4, err_msg=key)
    with pytest.raises(ConfigError, match=r"kd.hidden_weight=1.0 with kd.teacher_cache: the cache holds"):
        distill.check_config(config(setup, "unused", **{"kd.hidden_weight": 1.0, "kd.teacher_cache": "somewhere"}))
    with pytest.raises(ConfigError, match=r"kd.hidden_weight=1.0: the student's 2 layers.*'0,1,2'"):
        distill.loss_of(set_fields(c, **{"kd.hidden_weight": 1.0, "student_layers": "0,1,2"}), out["student"],
                        teacher, make_mesh(1, 1, 1, devices=jax.devices()[:1]))


def test_select_best_exports_the_best_validation_step(setup, tmp_path):
    """train.select_best: the model kept, exported and reported is the one of the best validation
    eval (at lr 0.1 the tiny student's validation loss is lowest at the first eval, step 2 of 12)."""
    c = config(setup, tmp_path, **{"train.lr": 0.1, "train.eval_every": 2, "train.select_best": "val_loss",
                                   "mesh.num_devices": 1})
    run(c, "distill")
    evals = [json.loads(l) for l in open(tmp_path / "metrics.jsonl") if "val_loss" in l]
    best = json.load(open(tmp_path / "best" / "best.json"))
    assert best["step"] == min(evals, key=lambda e: e["val_loss"])["step"] < 12
    exported, tok = kdjax.load(str(tmp_path / "student"))
    rows = distill.make_rows(c.data, distill.load_splits(c.data), tok)
    v = evaluate.validation_loss(exported, rows["valid"], batch_size=8, chunk_size=96)["loss"]
    assert v == pytest.approx(best["value"], rel=1e-5) and v != pytest.approx(evals[-1]["val_loss"], rel=1e-3)
    c.train.select_best = "bleu"
    with pytest.raises(ValueError, match="select_best='bleu'"):
        distill.train(c, overwrite=True)


def test_sigkill_then_resume_is_bit_identical(setup, tmp_path):
    common = ["--config.teacher=" + str(setup / "teacher"), "--config.student_layers=every_other", "--config.data.source=" + str(setup / "pairs.jsonl"),
              "--config.data.layout=records", "--config.data.max_length=64", "--config.data.valid=8",
              "--config.data.test=4", "--config.train.steps=16", "--config.train.batch_size=8",
              "--config.train.log_every=1", "--config.train.eval_every=0", "--config.train.checkpoint_every=4",
              "--config.kd.chunk_size=96", "--config.eval.num_samples=0", "--config.mesh.num_devices=1",
              "--config.baseline=False", "--config.teacher_sft.steps=0", "--config.dtype=float32"]
    cmd = [sys.executable, "-m", "kdjax", "distill"] + common

    def run(out, *extra):
        return subprocess.run(cmd + [f"--config.out_dir={out}", *extra], capture_output=True, text=True, timeout=600)

    full = run(tmp_path / "full")
    assert full.returncode == 0, full.stderr[-3000:]

    out = tmp_path / "killed"
    sigkill_at(cmd + [f"--config.out_dir={out}"], "step 7/16")
    assert not (out / "student").exists()  # it really died mid-run
    resumed = run(out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "step 4" in resumed.stdout.split("resumed from")[1].splitlines()[0]
    a = dict(checkpoint.iter_hf_dir(str(tmp_path / "full" / "student")))
    b = dict(checkpoint.iter_hf_dir(str(out / "student")))
    assert sorted(a) == sorted(b)
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    # the resumed run's log continues the killed one's without duplicated steps
    steps = [json.loads(l)["step"] for l in open(out / "metrics.jsonl")]
    assert steps == list(range(1, 17))


def test_fused_attention_and_remat_train_to_the_einsums_loss(setup, tmp_path):
    """jax.nn.dot_product_attention (the cuDNN path's XLA twin) with remat trains as the einsums do."""
    common = {"train.steps": 4, "mesh.num_devices": 1}
    distill.train(config(setup, tmp_path / "xla", **common))
    out = distill.train(config(setup, tmp_path / "jax", **common, **{"attention": "jax", "remat": True,
                                                                     "remat_policy": "dots_with_no_batch_dims_saveable"}))
    assert out["student"].config.attention == "jax" and out["student"].config.remat
    np.testing.assert_allclose(losses_of(tmp_path / "jax"), losses_of(tmp_path / "xla"), rtol=2e-4)


def test_packed_rows_give_the_loss_and_gradient_of_the_same_rows_unpacked(setup):
    """data.packing (sequences laid end to end in a row, each attending inside its own segment), and
    data.repack (a step's one-sequence rows laid so after they are made)."""
    from functools import partial
    c = config(setup, "unused")
    teacher, tok = kdjax.load(str(setup / "teacher"))
    student = models.student_from_teacher(teacher, [0, 2])
    examples = data.tokenize(distill.load_splits(c.data)["train"], tok, max_length=48, template="minillm",
                             on_long_prompt="skip")[:6]
    unpacked = data.pack(examples, 96, pad_id=0)
    packed = data.pack(examples, 96, pad_id=0, packing=True)
    repacked = data.repack(unpacked, multiple=2)
    assert len(packed["input_ids"]) < len(unpacked["input_ids"]) and packed["segment_ids"].max() > 1
    assert len(repacked["input_ids"]) < len(unpacked["input_ids"]) and len(repacked["input_ids"]) % 2 == 0
    graphdef, params = nnx.split(student)
    params = nnx.to_pure_dict(params)
    tparams = nnx.to_pure_dict(nnx.state(teacher))
    for kd_ratio in (0.0, 0.5):
        kd = c.kd.copy_and_resolve_references()
        kd.kd_ratio = kd_ratio
        results = []
        for rows, is_packed in ((unpacked, False), (packed, True), (repacked, True)):
            rows = {k: jnp.asarray(v) for k, v in rows.items()}
            loss = partial(distill.kd_loss, graphdef=graphdef, teacher_graphdef=nnx.graphdef(teacher), kd=kd,
                           vocab_size=None, mesh=None, packed=is_packed)
            results.append(jax.value_and_grad(lambda p: loss(p, rows, tparams, distill.token_totals(rows))[0])(params))
        (la, ga), *others = results
        for lb, gb in others:
            assert float(la) == pytest.approx(float(lb), rel=1e-5)
            for a, b in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
                np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-4, atol=2e-6)


def test_diverging_run_stops_and_keeps_last_good_checkpoint(setup, tmp_path):
    c = config(setup, tmp_path / "nan", **{"train.lr": 1e38, "train.warmup_steps": 1, "train.checkpoint_every": 1,
                                           "train.clip_norm": 1e38, "mesh.num_devices": 1})
    with pytest.raises(loop.TrainingDiverged, match=r"at step (\d+): not finite.*last good checkpoint is step") as e:
        distill.train(c)
    bad = int(e.value.args[0].split("at step ")[1].split(":")[0])
    good = int(e.value.args[0].split("last good checkpoint is step ")[1].split()[0])
    assert good == bad - 1 >= 1
    steps = sorted(int(d) for d in os.listdir(tmp_path / "nan" / "checkpoints") if d.isdigit())
    assert steps[-1] == good
    import orbax.checkpoint as ocp
    restored = ocp.CheckpointManager(str(tmp_path / "nan" / "checkpoints")).restore(good)
    leaves = jax.tree.leaves(restored["state"]["params"])
    assert leaves and all(np.isfinite(np.asarray(x)).all() for x in leaves)


def test_teacher_answers_train_on_the_teachers_greedy_answers(setup, tmp_path):
    """issue 14, sequence-level KD: the KD rows are each prompt followed by the teacher's greedy
    answer (checked against an argmax loop over the teacher's full forward, no KV cache), with the
    loss on the answer; every row the run reads has one, and a resumed run reads them back."""
    c = config(setup, tmp_path, **{"kd.teacher_answers": True, "kd.answer_tokens": 12, "train.steps": 2,
                                   "eval.batch_size": 16, "mesh.num_devices": 1})
    out = distill.train(c)
    stored = json.load(open(tmp_path / distill.ANSWERS))
    answers = {int(i): a for i, a in stored["answers"].items()}
    splits, tok, rows, teacher = out["splits"], out["tokenizer"], out["rows"], out["teacher"]
    n = len(rows["train"]["input_ids"])
    read = {int(i) for s in range(2) for i in data.batch_indices(n, s, batch_size=8, seed=0)}
    examples = data.tokenize(splits["train"], tok, max_length=64, template=c.data.template, on_long_prompt="skip")
    stops = set(rollout.stop_tokens_of(tok, teacher.config))
    assert set(answers) == read
    for i, a in answers.items():  # 12 tokens, or what the row's own prompt leaves of 64, or up to a stop token
        assert 1 <= len(a) and (len(a) == min(12, 64 - len(examples[i].prompt_ids)) or a[-1] in stops), (i, a)
    i = min(read, key=lambda i: len(examples[i].prompt_ids))  # the longest answer
    ids, forward = list(examples[i].prompt_ids), nnx.jit(lambda m, x: m(x))
    for _ in answers[i]:  # causal: the logits at the last token do not see the padding after it
        logits = forward(teacher, jnp.asarray([ids + [0] * (64 - len(ids))]))
        ids.append(int(np.asarray(logits)[0, len(ids) - 1].argmax()))
    assert ids[len(examples[i].prompt_ids):] == answers[i], i
    c.resume = True
    batches = distill.AnswerBatches(c, rows["train"], examples, tok, None, str(tmp_path / distill.ANSWERS))
    b = batches(0).arrays  # read back: no teacher needed
    i = int(data.batch_indices(n, 0, batch_size=8, seed=0)[0])
    p, a = len(examples[i].prompt_ids), answers[i]
    assert list(b["input_ids"][0, :p + len(a)]) == list(examples[i].prompt_ids) + a
    assert b["loss_mask"][0].sum() == len(a) and b["loss_mask"][0, p - 1] == 1
    # kd.answer_share 0.5: the first 4 rows of a step on the teacher's answers, the other 4 the data rows as they are;
    # only those 4 need an answer (with no teacher given, a missing one would have to be generated and fail)
    c.kd.answer_share = 0.5
    idx = [data.batch_indices(n, s, batch_size=8, seed=0) for s in range(2)]
    half = tmp_path / "half.json"
    half.write_text(json.dumps({"answers": {str(i): answers[int(i)] for ix in idx for i in ix[:4]}}))
    b = distill.AnswerBatches(c, rows["train"], examples, tok, None, str(half))(1).arrays
    for k in data.ROW_KEYS:
        np.testing.assert_array_equal(b[k][4:], rows["train"][k][idx[1][4:]], err_msg=k)
    j = int(idx[1][0])
    assert list(b["input_ids"][0, len(examples[j].prompt_ids):][:len(answers[j])]) == answers[j]
    for share in (0.0, 0.05, 1.5):  # batch_size 8: 0.05 of it rounds to no row
        c.kd.answer_share = share
        with pytest.raises(ConfigError, match="kd.answer_share"):
            distill.check_config(c)
