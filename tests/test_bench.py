"""The benchmark scripts run end to end on CPU at tiny sizes and report consistent numbers.

Not timed tests: no speed is asserted. What is checked: the JSON fields the anchors' readers
use, that derived figures agree with their inputs (tokens/s with the step time, FLOPs per token
with parameter counts taken from the model itself), and the activation-memory measurement on a
function whose residuals are known by hand.
"""
import gzip
import importlib.util
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from kdjax.config import ModelConfig
from kdjax.model import Qwen2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _module(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(ROOT, "bench", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(script, *flags):
    """Runs bench/<script>.py in a fresh process (CPU, 8 simulated devices from conftest's env)."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", script), *flags], capture_output=True,
                          text=True, timeout=300, env=dict(os.environ), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    assert len(lines) == 1, proc.stdout
    return json.loads(lines[0])


def _run_lines(script, *flags):
    """Every JSON line of bench/<script>.py run in a fresh process."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", script), *flags], capture_output=True,
                          text=True, timeout=600, env=dict(os.environ), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(l) for l in proc.stdout.splitlines() if l.startswith("{")]


def _param_count(preset):
    """Parameters counted from the model's own (abstract) state, not from ModelConfig.num_params."""
    state = nnx.state(nnx.eval_shape(lambda: Qwen2(ModelConfig.preset(preset))))
    return sum(math.prod(x.shape) for x in jax.tree.leaves(state))


def test_kd_step_runs_on_a_2x2x2_mesh_and_reports_consistent_figures():
    r = _run("kd_step.py", "--student=tiny-qwen2", "--teacher=tiny-llama", "--batch=4", "--seq=32", "--steps=2",
             "--warmup=1", "--data=2", "--fsdp=2", "--tensor=2", "--chunk_size=48", "--peak_tflops=2")
    assert (r["bench"], r["impl"], r["student"], r["teacher"]) == ("kd_step", "kdjax", "tiny-qwen2", "tiny-llama")
    assert r["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2} and r["backend"] == "cpu"
    assert (r["batch"], r["seq"], r["chunk_size"], r["remat"]) == (4, 32, 48, True)
    ns, nt = _param_count("tiny-qwen2"), _param_count("tiny-llama")
    assert (r["n_student"], r["n_teacher"]) == (ns, nt)
    assert r["flops_per_token"] == 6 * ns + 2 * nt
    assert r["step_s"] > 0 and r["step_s_min"] <= r["step_s"]
    assert r["tokens_per_s"] == pytest.approx(4 * 32 / r["step_s"], rel=0.02)
    assert r["model_tflops"] == pytest.approx(r["flops_per_token"] * 4 * 32 / r["step_s"] / 1e12, abs=0.06)
    assert r["mfu"] == pytest.approx(r["model_tflops"] / 2, abs=0.03)
    assert r["peak_gib"] is None  # the CPU backend keeps no memory stats: XLA's analysis instead
    for k in ("xla_arg_gib", "xla_out_gib", "xla_alias_gib", "xla_temp_gib", "xla_peak_gib", "saved_activation_gib"):
        assert r[k] >= 0, k
    assert r["compile_s"] > 0 and math.isfinite(r["loss"]) and r["loss"] > 0 and math.isfinite(r["grad_norm"])


def test_generate_reports_every_generated_token():
    r = _run("generate.py", "--model=tiny-qwen2", "--batch=3", "--prompt=8", "--new=6", "--repeats=2")
    assert (r["bench"], r["impl"], r["model"], r["batch"], r["prompt"], r["new"]) == (
        "generate", "kdjax", "tiny-qwen2", 3, 8, 6)
    assert r["s"] > 0 and r["s_min"] <= r["s"]
    assert r["gen_tokens_per_s"] == pytest.approx(3 * 6 / r["s"], rel=0.02, abs=1)
    assert r["peak_gib"] is None and r["xla_peak_gib"] >= 0 and r["compile_s"] > 0


def test_saved_activation_bytes_counts_residuals_not_inputs():
    kd = _module("kd_step")
    w = jax.ShapeDtypeStruct((128, 256), jnp.float32)
    x = jax.ShapeDtypeStruct((64, 128), jnp.float32)
    # d/dw sum(sin(x @ w)) keeps cos(x @ w) [64, 256] fp32; x is an input and is not counted.
    assert kd.saved_activation_bytes(lambda w, x: jnp.sum(jnp.sin(x @ w)), w, x) == 64 * 256 * 4
    # Rematerialised, only inputs are kept.
    assert kd.saved_activation_bytes(jax.checkpoint(lambda w, x: jnp.sum(jnp.sin(x @ w))), w, x) == 0


def test_flags_are_checked():
    kd, gen = _module("kd_step"), _module("generate")
    with pytest.raises(SystemExit):
        kd.parse_args(["--batch=6", "--grad_accum=4"])
    with pytest.raises(SystemExit):
        gen.parse_args(["--new=0"])
    a = kd.parse_args([])
    assert (a.student, a.teacher, a.batch, a.seq, a.dtype, a.param_dtype, a.peak_tflops) == (
        "qwen2.5-0.5b", "qwen2.5-3b", 16, 1024, "bfloat16", "float32", 989.0)
    g = gen.parse_args([])
    assert (g.model, g.batch, g.prompt, g.new) == ("qwen2.5-0.5b", 256, 256, 512)


def test_profile_summary_ranks_device_events(tmp_path):
    kd = _module("kd_step")
    run = tmp_path / "plugins" / "profile" / "2026_11_23"
    run.mkdir(parents=True)
    events = [dict(ph="M", name="process_name", pid=1, args=dict(name="/host:CPU")),
              dict(ph="M", name="process_name", pid=2, args=dict(name="/device:GPU:0")),
              dict(ph="M", name="thread_name", pid=2, tid=7, args=dict(name="stream 7")),
              dict(ph="X", pid=1, tid=1, name="python", dur=9000.0),
              dict(ph="X", pid=2, tid=7, name="gemm", dur=3000.0),
              dict(ph="X", pid=2, tid=7, name="softmax", dur=1000.0),
              dict(ph="X", pid=2, tid=7, name="gemm", dur=2000.0)]
    with gzip.open(run / "host.trace.json.gz", "wt") as f:
        json.dump(dict(traceEvents=events), f)
    assert kd.profile_summary(str(tmp_path)) == {
        "/device:GPU:0 / stream 7": [["gemm", 5.0, 0.8333], ["softmax", 1.0, 0.1667]]}


def test_gpu_session_script_writes_the_json_lines_of_a_part(tmp_path):
    """bench/gpu_session.sh (the device-call wrapper) on CPU: anchors skipped with a reason, the
    kdjax lines of the part written to $OUT/PART.jsonl with the arguments they were run with."""
    env = dict(os.environ, OUT=str(tmp_path), PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
               GEN_ARGS="--model=tiny-qwen2 --batch=2 --prompt=8 --new=8 --repeats=1 --warmup=0")
    proc = subprocess.run(["bash", "bench/gpu_session.sh", "gen"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(l) for l in open(tmp_path / "gen.jsonl")]
    assert lines[0]["part"] == "gen" and "skipped" in lines[1]
    assert [(r["bench"], r["batch"], r["model"]) for r in lines[2:]] == [("generate", 2, "tiny-qwen2")] * 2
    bad = subprocess.run(["bash", "bench/gpu_session.sh", "nope"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert "unknown part nope" in bad.stderr


def test_cpu_kd_vs_torch_runs_both_sides_alternating_and_reports_their_ratio():
    r = _run_lines("cpu_kd_vs_torch.py", "--student=tiny-qwen2", "--teacher=tiny-qwen2", "--batch=2", "--seq=16",
                   "--rounds=2", "--steps=1", "--warmup=1")
    sides, summary = r[:-1], r[-1]
    assert [(s["side"], s["round"]) for s in sides] == [("torch", 0), ("kdjax", 0), ("torch", 1), ("kdjax", 1)]
    assert summary["bench"] == "cpu_kd_vs_torch" and summary["dtype"] == "float32"
    assert len(summary["step_s"]["torch"]) == len(summary["step_s"]["kdjax"]) == 2
    for side in ("torch", "kdjax"):
        median = sorted(t for s in sides if s["side"] == side for t in s["times"])
        assert summary[f"{side}_tokens_per_s"] == pytest.approx(2 * 16 / ((median[0] + median[1]) / 2), rel=0.02)
    assert summary["ratio"] == pytest.approx(summary["kdjax_tokens_per_s"] / summary["torch_tokens_per_s"], rel=0.01)


def test_gptq_bench_reports_its_floor_and_ratio():
    res = _run("gptq.py", "--model=tiny-qwen2", "--rows=4", "--length=16", "--batch=2", "--group_size=32")
    assert res["bench"] == "gptq" and res["linears"] == 14 and (res["rows"], res["length"]) == (4, 16)
    parts = res["forward_s"] + res["hessian_s"] + res["solver_s"]
    assert res["floor_s"] == pytest.approx(parts, abs=0.011) and res["solver_s"] > 0
    assert res["ratio"] == pytest.approx(res["gptq_s"] / res["floor_s"], rel=0.01, abs=0.002)
