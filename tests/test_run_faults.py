"""Runs that never hang, mix or fail late, and input errors that are one line: each fault of
the run directory (locked, earlier run's checkpoints, changed config, read-only, full disk) and
each bad input is a clear error, exit 2, within seconds, and nothing of an earlier run is lost."""
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import kdjax
from kdjax import data, gguf_io
from kdjax.config import ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    _, _, tok = gguf_io.read_gguf(gguf_io.preset_path("smollm2-135m-instruct"))
    cfg = ModelConfig.preset("tiny-llama", vocab_size=300, num_layers=2, max_position_embeddings=128)
    kdjax.save(kdjax.Qwen2(cfg, seed=1), str(root / "teacher"), format="kdjax", tokenizer=tok)
    data.save_records([data.Record(prompt=f"f{i}", response=f"g{i}") for i in range(30)], str(root / "p.jsonl"))
    return root


def args(setup, out, *extra):
    return ["distill", f"--config.teacher={setup / 'teacher'}", "--config.student_layers=every_other",
            f"--config.data.source={setup / 'p.jsonl'}", "--config.data.layout=records",
            "--config.data.template=plain", "--config.data.max_length=24", "--config.data.valid=2",
            "--config.data.test=2", "--config.train.batch_size=4", "--config.train.log_every=1",
            "--config.eval.num_samples=0", "--config.mesh.num_devices=1", "--config.baseline=False",
            "--config.teacher_sft.steps=0", "--config.dtype=float32",
            f"--config.out_dir={out}", *extra]


def kdjax_cli(*argv, prefix=(), timeout=240):
    t0 = time.time()
    proc = subprocess.run([*prefix, sys.executable, "-m", "kdjax", *argv], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)
    return proc, time.time() - t0


def one_line(proc, *words):
    """Exit 2, no traceback, one line naming `words` (and the --help hint of flag errors)."""
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "--help lists the flags" not in line]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr[-3000:]
    assert all(w in lines[0] for w in words), lines[0]
    return lines[0]


def test_the_out_dir_is_locked_and_never_mixes_runs(setup, tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "kdjax", *args(setup, out, "--config.train.steps=100000",
                                                                   "--config.train.checkpoint_every=2")],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in first.stdout:
            if line.startswith("step 3/"):
                break
        second, seconds = kdjax_cli(*args(setup, out, "--config.train.steps=4"))
        one_line(second, str(out), "in use by another run", f"pid {first.pid}")
        assert seconds < 60
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    kept = sorted(os.listdir(out / "checkpoints"))
    # finished steps, and at most the save the kill interrupted (orbax's tmp directory, never restored)
    assert any(d.isdigit() for d in kept) and all(d.isdigit() or d.endswith(".orbax-checkpoint-tmp") for d in kept)
    rows = (out / "metrics.jsonl").read_text()

    again, _ = kdjax_cli(*args(setup, out, "--config.train.steps=100000", "--config.train.checkpoint_every=2"))
    one_line(again, "holds checkpoints of an earlier run", "--resume", "--overwrite")
    changed, _ = kdjax_cli(*args(setup, out, "--config.train.steps=100000", "--config.train.checkpoint_every=2",
                                 "--config.train.lr=0.01"), "--resume")
    one_line(changed, "--resume", "train.lr: 0.0005 -> 0.01")
    assert sorted(os.listdir(out / "checkpoints")) == kept and (out / "metrics.jsonl").read_text() == rows

    fresh, _ = kdjax_cli(*args(setup, out, "--config.train.steps=2"), "--overwrite")
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert sorted(d for d in os.listdir(out / "checkpoints") if d.isdigit()) == ["2"]
    both, _ = kdjax_cli(*args(setup, out), "--resume", "--overwrite")
    one_line(both, "--resume and --overwrite")


def _private_mount(tmp_path):
    """A command prefix that runs in its own user + mount namespace (root there), or skip."""
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"no user + mount namespaces here ({probe.stderr.decode().strip()})")
    return ["unshare", "-rm", "sh", "-c"]


def _in_mount(tmp_path, mount_opts, target, argv):
    script = f"mount -t tmpfs -o {mount_opts} tmpfs '{target}' && exec \"$@\""
    return subprocess.run([*_private_mount(tmp_path), script, "sh", sys.executable, "-m", "kdjax", *argv],
                          capture_output=True, text=True, timeout=240, cwd=ROOT)


def test_read_only_checkpoints_dir_is_one_line_at_once(setup, tmp_path):
    out = tmp_path / "ro"
    (out / "checkpoints").mkdir(parents=True)
    t0 = time.time()
    proc = _in_mount(tmp_path, "ro,size=64k", out / "checkpoints", args(setup, out, "--config.train.steps=4"))
    one_line(proc, "checkpoints", "read-only")
    assert "step 1/" not in proc.stdout and time.time() - t0 < 60


def test_full_disk_ends_the_run_with_one_line(setup, tmp_path):
    out = tmp_path / "full"
    out.mkdir()
    # the tiny student's checkpoint (weights + AdamW moments) is ~0.4 MB: it cannot fit in 200 kB
    t0 = time.time()
    proc = _in_mount(tmp_path, "size=200k", out, args(setup, out, "--config.train.steps=50",
                                                      "--config.train.checkpoint_every=1"))
    one_line(proc, "the disk is full")
    assert time.time() - t0 < 120 and "step 50/50" not in proc.stdout


def _bad_config(tmp_path):
    path = tmp_path / "bad_config.py"
    path.write_text("from kdjax.train_config import get_config as base\n\n\ndef get_config():\n"
                    "    c = base()\n    c.train.stpes = 3\n    return c\n")
    return path


def _bad_safetensors(tmp_path):
    model = kdjax.Qwen2(ModelConfig.preset("tiny-llama", vocab_size=300, num_layers=1), seed=0)
    _, _, tok = gguf_io.read_gguf(gguf_io.preset_path("smollm2-135m-instruct"))
    d = tmp_path / "bad_st"
    kdjax.save(model, str(d), format="hf", tokenizer=tok)
    raw = (d / "model.safetensors").read_bytes()
    n = int(np.frombuffer(raw[:8], np.uint64)[0])
    header = raw[8:8 + n].replace(b'"shape":[300,64]', b'"shape":[300,65]', 1)
    assert len(header) == n
    (d / "model.safetensors").write_bytes(raw[:8] + header + raw[8 + n:])
    return d


@pytest.mark.parametrize("case", ["config_field", "not_utf8", "empty_data", "missing_model", "enum_first",
                                  "safetensors_shape", "negative_tokens"])
def test_input_errors_are_one_line_naming_what_is_wrong(setup, tmp_path, case):
    out = tmp_path / "out"
    if case == "config_field":
        proc, _ = kdjax_cli("distill", f"--config={_bad_config(tmp_path)}")
        one_line(proc, "bad_config.py, line 6", "'stpes'", 'Did you mean "steps"')
    elif case == "not_utf8":
        (tmp_path / "bad.jsonl").write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "caf\xe9", "response": "x"}\n')
        proc, _ = kdjax_cli(*args(setup, out, f"--config.data.source={tmp_path / 'bad.jsonl'}"))
        one_line(proc, "bad.jsonl, line 2", "not UTF-8")
    elif case == "empty_data":
        (tmp_path / "empty.jsonl").write_text("")
        proc, _ = kdjax_cli(*args(setup, out, f"--config.data.source={tmp_path / 'empty.jsonl'}"))
        one_line(proc, "empty.jsonl", "no records")
    elif case == "missing_model":
        proc, _ = kdjax_cli(*args(setup, out, f"--config.teacher={tmp_path / 'runs' / 'nope' / 'student'}"))
        one_line(proc, "nope/student", "no such model directory")
    elif case == "enum_first":  # checked before anything is loaded (the missing teacher is not reached)
        proc, seconds = kdjax_cli(*args(setup, out, "--config.kd.divergence=kl", "--config.teacher=/no/such/dir"))
        one_line(proc, "--config.kd.divergence", "'kl'", "forward_kl")
        assert not out.exists()
    elif case == "safetensors_shape":
        proc, _ = kdjax_cli("generate", f"--model={_bad_safetensors(tmp_path)}", "--prompt=hi")
        one_line(proc, "model.safetensors", "[300, 65]", "needs")
    elif case == "negative_tokens":
        proc, _ = kdjax_cli("generate", "--prompt=hi", "--max_new_tokens=-1")
        one_line(proc, "--max_new_tokens=-1")
