"""`kdjax plan`: real TPU compiles (libtpu's compile-only client, no TPU) of tiny models' programs.

Checked: slice names; the HLO accounting against XLA's own cost analysis where that one is right
(no loops) and against arithmetic where it is not (loops); a tiny KD step and its generation compile
for v5e:2x2 and v4:2x2x1 with per-chip figures that follow from the shapes; per-chip arguments
shrink as FSDP grows; a config that cannot fit is one line with the numbers, not a traceback.
"""
import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from helpers import run_kdjax, set_fields
from kdjax import hlo_cost, plan, programs
from kdjax.config import ModelConfig
from kdjax.train_config import get_config

TINY = ["--config.teacher=tiny-qwen2", "--config.student_layers=every_other", "--config.data.max_length=64",
        "--config.train.batch_size=8", "--config.eval.batch_size=4", "--config.eval.max_new_tokens=8",
        "--config.mesh.data=1", "--config.mesh.fsdp=-1", "--config.kd.chunk_size=64", "--config.eval.before=False"]


def tiny_config(**fields):
    """The train config with TINY's overrides, then `fields`."""
    c = set_fields(get_config(), teacher="tiny-qwen2", student_layers="every_other", **{
        "data.max_length": 64, "train.batch_size": 8, "eval.batch_size": 4, "eval.max_new_tokens": 8,
        "mesh.data": 1, "mesh.fsdp": -1, "kd.chunk_size": 64, "eval.before": False})
    return set_fields(c, **fields)


@pytest.fixture(scope="module")
def v5e_2x2():
    return plan.slice_devices(plan.parse_slice("v5e:2x2"))


def test_slice_names_map_to_topologies():
    cases = {"v4-8": ("v4:2x2x1", 4, 1), "v5e-16": ("v5e:4x4", 16, 2), "v5litepod-8": ("v5e:2x4", 8, 1),
             "v5p-8": ("v5p:2x2x1", 4, 1), "v6e-8": ("v6e:2x4", 8, 1), "v5e:2x2": ("v5e:2x2", 4, 1),
             "v4:2x2x2": ("v4:2x2x2", 8, 2)}
    for name, (topology, chips, hosts) in cases.items():
        sl = plan.parse_slice(name)
        assert (sl.topology, sl.chips, sl.hosts) == (topology, chips, hosts), name
    assert plan.parse_slice("v4:2x2x1").name == "v4-8" and plan.parse_slice("v5e:4x4").name == "v5litepod-16"
    for bad in ("v5e-3", "v4-12", "v5e:2x2x1", "h100-8", "v4"):
        with pytest.raises(ValueError, match="--topology"):
            plan.parse_slice(bad)


def test_hlo_cost_counts_loops_that_xla_counts_once(v5e_2x2):
    mesh = Mesh(np.array(v5e_2x2), ("x",))
    a = jax.ShapeDtypeStruct((512, 1024), jnp.bfloat16, sharding=NamedSharding(mesh, P("x")))
    b = jax.ShapeDtypeStruct((1024, 1024), jnp.bfloat16, sharding=NamedSharding(mesh, P()))
    one = jax.jit(lambda a, b: jnp.tanh(a @ b)).lower(a, b).compile()
    seven = jax.jit(lambda a, b: jax.lax.scan(lambda c, _: (jnp.tanh(c @ b), None), a, None, length=7)[0]
                    ).lower(a, b).compile()
    matmul = 2 * 128 * 1024 * 1024  # a chip's rows: 512 / 4
    cost, once = hlo_cost.program_cost(one.as_text())
    assert cost.flops == matmul == once.flops
    assert one.cost_analysis()["flops"] == pytest.approx(matmul, rel=0.01)  # XLA: + the tanh's
    # one operand of 256 KiB and the 2 MiB weight in, the 256 KiB result out, at least once
    assert cost.bytes >= (128 * 1024 + 1024 * 1024 + 128 * 1024) * 2
    cost, once = hlo_cost.program_cost(seven.as_text())
    assert cost.flops == 7 * matmul and once.flops == matmul
    assert seven.cost_analysis()["flops"] == pytest.approx(matmul, rel=0.01)  # what XLA misses


def test_hlo_cost_counts_batched_matmuls_written_as_convolutions(v5e_2x2):
    """Attention's einsums reach the TPU HLO as dilated convolutions: their FLOPs are the einsum's."""
    mesh = Mesh(np.array(v5e_2x2), ("x",))
    q = jax.ShapeDtypeStruct((8, 64, 2, 3, 16), jnp.float32, sharding=NamedSharding(mesh, P("x")))
    k = jax.ShapeDtypeStruct((8, 48, 2, 16), jnp.float32, sharding=NamedSharding(mesh, P("x")))
    f = jax.jit(lambda q, k: jnp.einsum("btkgd,bskd->bkgts", q, k))
    compiled = f.lower(q, k).compile()
    cost, _ = hlo_cost.program_cost(compiled.as_text())
    assert cost.flops == 2 * 2 * 64 * 2 * 3 * 16 * 48  # 2 rows a chip
    assert compiled.cost_analysis()["flops"] == pytest.approx(cost.flops, rel=0.01)


@pytest.mark.parametrize("topology", ["v5e:2x2", "v4:2x2x1"])
def test_kd_step_and_generation_compile_for_a_tpu_slice(topology):
    sl = plan.parse_slice(topology)
    cfg = tiny_config()
    report = plan.plan(cfg, topology, "distill", log=lambda m: None)
    assert report["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1} and report["chips"] == 4
    names = [p["program"] for p in report["programs"]]
    assert names == ["train_step", "generate"]
    for p in report["programs"]:
        assert p["fits"] and 0 < p["peak_gib"] < sl.chip.xla_hbm_gib, p
        assert p["compute_ms"] > 0 and p["memory_ms"] > 0 and p["compile_s"] > 0
        assert p["step_ms"] == pytest.approx(max(p["compute_ms"], p["memory_ms"]), rel=1e-3)
        assert p["tokens_per_s"] == pytest.approx(p["tokens"] / p["step_ms"] * 1e3, rel=1e-3)
        assert p["mfu"] == pytest.approx(p["model_flops"] / 4 / (p["step_ms"] / 1e3 * sl.chip.bf16_tflops * 1e12),
                                         rel=1e-2)
        assert p["hbm_bytes"] >= p["hbm_bytes_floor"] > 0 and p["top_bytes"]
    step = report["programs"][0]
    assert step["tokens"] == 8 * 64
    # the compiled matmuls of a chip against the model's count (6 N + 2 N + attention, a quarter):
    # they differ by what the model count leaves out (the teacher's unused head rows are computed)
    assert 0.8 < step["flops"] / (step["model_flops"] / 4) < 1.5
    gen = report["programs"][1]
    assert gen["tokens"] == 4 * 8
    assert any("kdjax/" in where for where, _ in step["top_bytes"])  # bytes named by their source line


def test_per_chip_arguments_shrink_as_fsdp_grows(v5e_2x2):
    sl = plan.parse_slice("v5e:2x2")
    args = {}
    for data, fsdp in ((4, 1), (2, 2), (1, 4)):
        cfg = tiny_config(**{"mesh.data": data, "mesh.fsdp": fsdp})
        mesh = plan.make_mesh(cfg, v5e_2x2)
        args[fsdp] = plan.compile_program(programs.train_step(cfg, mesh), sl)["args_gib"]
    assert args[1] > args[2] > args[4]
    assert args[4] < 0.4 * args[1]  # parameters, AdamW moments and the teacher split four ways


def test_cli_json_report_and_an_impossible_config_in_one_line(tmp_path):
    ok = run_kdjax("plan", "--config=kdjax/train_config.py", "--topology=v5e:2x2", "--json", *TINY)
    assert ok.returncode == 0, ok.stderr[-3000:]
    report = json.loads(ok.stdout.strip().splitlines()[-1])
    assert report["topology"] == "v5e:2x2" and report["libtpu"] not in ("", "not installed")
    assert [p["program"] for p in report["programs"]][0] == "train_step"
    assert "roofline" in ok.stderr and "most bytes" in ok.stderr

    # the tiny model with a long context, rows of 32k tokens: one layer's fp32 attention scores are
    # 16 GiB a chip
    hf = ModelConfig.preset("tiny-qwen2", max_position_embeddings=32768).to_hf()
    (tmp_path / "config.json").write_text(json.dumps(hf))
    big = run_kdjax("plan", "--config=kdjax/train_config.py", "--topology=v5e:2x2", *TINY,
                    f"--config.teacher={tmp_path}", "--config.train.batch_size=4", "--config.data.max_length=32768",
                    "--config.eval.num_samples=0")
    assert big.returncode == 1, big.stderr[-3000:]
    assert "Traceback" not in big.stdout + big.stderr
    line = next(l for l in big.stdout.splitlines() if "DOES NOT FIT" in l)
    needed, over = (float(x) for x in re.search(r"needs ([\d.]+) GiB a chip, ([\d.]+) GiB over", line).groups())
    assert needed > 15.75 and over == pytest.approx(needed - 15.75, abs=0.02)
    assert "--config.remat=True" in line and "--config.train.grad_accum=2" in line


def test_other_commands_skip_the_tpu_probe_off_a_tpu_vm():
    from kdjax.cli import skip_tpu_probe_off_tpu
    env = {}
    skip_tpu_probe_off_tpu(env)  # libtpu is installed here (the test extra), this machine has no TPU
    assert env == {"JAX_PLATFORMS": "cuda,cpu"}
    env = {"JAX_PLATFORMS": "tpu"}
    skip_tpu_probe_off_tpu(env)
    assert env == {"JAX_PLATFORMS": "tpu"}
    assert plan.compile_env({})["ALLOW_MULTIPLE_LIBTPU_LOAD"] == "1"  # no host lockfile for compile-only


def test_search_turns_one_knob_at_a_time_and_ranks_what_fits():
    cfg = tiny_config()
    tried = plan.search(cfg, "v5e:2x2", "distill", budget=4, log=lambda m: None)
    assert len(tried) == 4 and all(t["fits"] for t in tried)
    assert tried[0]["tokens_per_s"] >= max(t["tokens_per_s"] for t in tried)
    assert {} in [t["overrides"] for t in tried]  # the config as given (fsdp over all 4 chips)
    meshes = [t["overrides"] for t in tried if "mesh.tensor" in t["overrides"] or "mesh.data" in t["overrides"]]
    assert meshes and all(o.get("mesh.data", 1) * o.get("mesh.fsdp", 4) * o.get("mesh.tensor", 1) == 4
                          for o in meshes)


def test_a_missing_model_shape_is_one_clear_error():
    cfg = tiny_config(teacher="/nowhere/Some-Model")
    with pytest.raises(ValueError, match=r"--config.teacher='/nowhere/Some-Model'.*config.json"):
        programs.model_configs(cfg)
    assert math.isclose(plan.CHIPS["v5e"].bf16_tflops, 197.0)


def test_minillm_and_grpo_steps_and_samplers_compile():
    from kdjax.grpo_config import get_config as grpo_config
    cfg = tiny_config(**{"minillm.max_new_tokens": 8})
    report = plan.plan(cfg, "v5e:2x2", "minillm", log=lambda m: None)
    assert [(p["program"], p["fits"]) for p in report["programs"]] == [
        ("train_step", True), ("sampler", True), ("generate", True)]
    assert report["programs"][1]["tokens"] == 8 * 8  # a completion of 8 new tokens a prompt
    g = set_fields(grpo_config(), teacher="tiny-qwen2", **{
        "data.max_length": 64, "train.batch_size": 2, "grpo.num_generations": 4, "grpo.max_new_tokens": 8,
        "eval.num_samples": 0, "mesh.data": 1, "mesh.fsdp": -1})
    report = plan.plan(g, "v5e:2x2", log=lambda m: None)  # the config's mode: grpo
    step, sampler = report["programs"]
    assert (step["program"], sampler["program"]) == ("train_step", "sampler") and step["fits"] and sampler["fits"]
    assert step["tokens"] == 8 * (64 + 8) and sampler["tokens"] == 8 * 8
