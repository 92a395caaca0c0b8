"""kdjax study: a grid of KD runs x seeds, cells that train the same merged, mean and spread per cell."""
import json

import numpy as np
import pytest

import kdjax
from kdjax import data, gguf_io, train_config
from kdjax.config import ModelConfig
from kdjax.training import study
from helpers import run_kdjax, set_fields


def test_cells_merge_what_trains_the_same():
    grid = {"kd.kd_ratio": [0.0, 0.5], "kd.divergence": ["forward_kl", "reverse_kl"], "train.lr": [1e-3]}
    got = [study.effective(c) for c in study.cells(grid)]
    assert got == [{"kd.kd_ratio": 0.0, "train.lr": 1e-3},
                   {"kd.kd_ratio": 0.5, "kd.divergence": "forward_kl", "train.lr": 1e-3},
                   {"kd.kd_ratio": 0.5, "kd.divergence": "reverse_kl", "train.lr": 1e-3}]
    cfg = train_config.get_config()
    assert study.parse_grid("kd.kd_ratio=0,0.5 teacher_sft.steps=0,40", cfg) == {
        "kd.kd_ratio": [0.0, 0.5], "teacher_sft.steps": [0, 40]}
    with pytest.raises(ValueError, match="no field 'kd.ratio'"):
        study.parse_grid("kd.ratio=0,1", cfg)


def test_summary_is_the_mean_and_spread_over_seeds_of_each_cell():
    rng = np.random.default_rng(0)
    runs = [dict(cell={"kd.kd_ratio": r}, seed=s, seconds=10.0 + s, **{m: float(rng.normal()) for m in study.METRICS})
            for r in (0.0, 1.0) for s in (0, 1, 2)]
    summary = study.summarize(runs)
    assert [row["cell"] for row in summary] == [{"kd.kd_ratio": 0.0}, {"kd.kd_ratio": 1.0}]
    for row in summary:
        mine = [r for r in runs if r["cell"] == row["cell"]]
        assert row["seeds"] == [0, 1, 2] and row["seconds"] == pytest.approx(11.0)
        for m in study.METRICS:
            values = np.array([r[m] for r in mine], np.float64)
            assert row[m] == pytest.approx(values.mean()) and row[m + "_std"] == pytest.approx(values.std())


def test_study_runs_every_cell_once_and_resumes_without_training(tmp_path):
    _, _, tok = gguf_io.read_gguf(gguf_io.preset_path("smollm2-135m-instruct"))
    cfg = ModelConfig.preset("tiny-llama", vocab_size=300, num_layers=4, max_position_embeddings=128)
    kdjax.save(kdjax.Qwen2(cfg, seed=1), str(tmp_path / "teacher"), format="kdjax", tokenizer=tok)
    data.save_records([data.Record(prompt=f"f{i}", response=f"g{i}") for i in range(30)], str(tmp_path / "p.jsonl"))
    args = [f"--config.teacher={tmp_path / 'teacher'}", "--config.student_layers=every_other",
            f"--config.data.source={tmp_path / 'p.jsonl'}", "--config.data.layout=records",
            "--config.data.template=plain", "--config.data.max_length=24", "--config.data.valid=2",
            "--config.data.test=4", "--config.train.steps=2", "--config.train.batch_size=4",
            "--config.eval.num_samples=4", "--config.eval.max_new_tokens=4", "--config.mesh.num_devices=1",
            "--config.teacher_sft.steps=0", "--config.dtype=float32",
            f"--config.out_dir={tmp_path / 'study'}", "--grid=kd.kd_ratio=0,1 kd.divergence=forward_kl,reverse_kl",
            "--seeds=0"]
    proc = run_kdjax("study", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.load(open(tmp_path / "study" / "study.json"))
    assert len(out["runs"]) == 3 and len(out["summary"]) == 3  # kd_ratio 0: one cell, not two
    assert len({r["out_dir"] for r in out["runs"]}) == 3  # one run directory each
    assert {r["cell"].get("kd.divergence") for r in out["runs"]} == {None, "forward_kl", "reverse_kl"}
    assert "kd.divergence=reverse_kl" in (tmp_path / "study" / "study.md").read_text()
    assert (tmp_path / "study" / "study.png").stat().st_size > 1000
    # one student made of the teacher's layers for every run; a scored run's checkpoints removed
    assert len(list((tmp_path / "study").glob("student-*/kdjax_config.json"))) == 1
    for r in out["runs"]:
        assert (tmp_path / "study" / r["out_dir"] / "metrics.jsonl").exists()
        assert not (tmp_path / "study" / r["out_dir"] / "checkpoints").exists()
        assert not (tmp_path / "study" / r["out_dir"] / "student_init").exists()
    refused = run_kdjax("study", *args)  # neither --resume nor --overwrite: a scored run is not trained over
    assert refused.returncode != 0 and "holds a scored run of an earlier study" in refused.stderr, refused.stderr[-2000:]
    again = run_kdjax("study", *args, "--resume")  # every run finished: nothing trains again
    assert again.returncode == 0 and "step 1/" not in again.stdout, again.stderr[-2000:]
    assert json.load(open(tmp_path / "study" / "study.json"))["summary"] == out["summary"]
