"""Several processes on JAX's own runtime (jax.distributed, CPU collectives over gloo): 2 and 4
processes on localhost, each with its share of 8 simulated devices, train exactly as one process on
the same global mesh; a checkpoint written by 2 processes continues in 1 process on another mesh;
each process places only its own rows of a batch, and together they place all of them."""
import json
import os
import shutil

import numpy as np
import pytest

from kdjax import checkpoint
from helpers import launch, write_tiny_run


# One process of a run: its id, the process count, then the trainer and its config fields as JSON.
WORKER = r"""
import json, os, sys
pid, n, mode, fields = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
import jax
if n > 1:  # as `kdjax COMMAND --distributed --coordinator=... --num_processes=... --process_id=...`
    from absl import flags
    from kdjax.commands import train_flags
    train_flags.define_flags()
    flags.FLAGS(["worker", "--distributed", "--coordinator=" + os.environ["COORDINATOR"], f"--num_processes={n}",
                 f"--process_id={pid}"])
    train_flags.initialize_distributed()
from kdjax import grpo_config, train_config
from kdjax.training import distill, grpo
from kdjax.training.run import run
c = train_config.override(grpo_config.get_config() if mode == "grpo" else train_config.get_config(), fields)
c.mode = mode
if mode == "grpo":
    share_of_e = lambda texts, rec: {"total": [t.count("e") / max(len(t), 1) for t in texts]}
    grpo.train(c, reward_fn=share_of_e)
else:
    run(c, mode)
"""

# Which rows of a global batch each process places (kdjax.sharding.place_rows), as JSON lines.
ROWS = r"""
import json, os, sys
pid, n = int(sys.argv[1]), int(sys.argv[2])
import jax
import numpy as np
if n > 1:
    os.environ["XLA_FLAGS"] += " --xla_cpu_collective_timeout_seconds=1800"
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(os.environ["COORDINATOR"], num_processes=n, process_id=pid)
from kdjax import sharding
mesh = sharding.make_mesh(2, 2, 2)
batch = np.arange(16 * 3).reshape(16, 3)
placed = sharding.place_rows({"x": batch}, mesh)["x"]
rows = sorted({int(r) for s in placed.addressable_shards for r in np.asarray(s.data)[:, 0] // 3})
mine = sharding.process_rows(mesh, 16)
print("ROWS=" + json.dumps({"process": pid, "rows": rows, "slice": [mine.start, mine.stop]}), flush=True)
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return write_tiny_run(tmp_path_factory.mktemp("distributed"))


def fields(setup, out, **kw):
    f = {"teacher": str(setup / "teacher"), "student_layers": "every_other", "out_dir": str(out),
         "data.source": str(setup / "p.jsonl"), "data.layout": "records", "data.template": "plain",
         "data.max_length": 32, "data.valid": 4, "data.test": 4, "train.batch_size": 8, "train.steps": 6,
         "train.lr": 1e-2, "train.warmup_steps": 0, "train.log_every": 1, "train.checkpoint_every": 2,
         "kd.chunk_size": 48, "eval.num_samples": 0, "baseline": False, "mesh.data": 2, "mesh.fsdp": 2,
         "mesh.tensor": 2}
    f.update(kw)
    return json.dumps(f)


def losses(out):
    return [(r["step"], r["loss"]) for r in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if "loss" in r]


def hf_params(path):
    return dict(checkpoint.iter_hf_dir(str(path)))


@pytest.fixture(scope="module")
def one_process(setup, tmp_path_factory):
    """The reference: 6 KD steps in one process on the global 2x2x2 mesh."""
    out = tmp_path_factory.mktemp("one")
    launch(WORKER, 1, "distill", fields(setup, out))
    return out


def test_kd_on_2_processes_equals_one_and_its_checkpoint_continues_in_1_process_on_another_mesh(
        setup, one_process, tmp_path):
    launch(WORKER, 2, "distill", fields(setup, tmp_path))
    assert_same_run(one_process, tmp_path)
    # the run "stopped" after its step-4 checkpoint (written by 2 processes): 1 process, mesh 1x4x2
    shutil.rmtree(tmp_path / "checkpoints" / "6")
    launch(WORKER, 1, "distill", fields(setup, tmp_path, resume=True, **{"mesh.data": 1, "mesh.fsdp": 4}))
    one, cut = dict(losses(one_process)), dict(losses(tmp_path))
    assert sorted(cut) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([cut[s] for s in (5, 6)], [one[s] for s in (5, 6)], rtol=1e-5)


def test_kd_on_4_processes_equals_one(setup, one_process, tmp_path):
    launch(WORKER, 4, "distill", fields(setup, tmp_path))
    assert_same_run(one_process, tmp_path)


def assert_same_run(one, many):
    """Same losses (written once, by process 0) and the same exported student."""
    a, b = losses(one), losses(many)
    assert [s for s, _ in a] == [1, 2, 3, 4, 5, 6] == [s for s, _ in b]
    np.testing.assert_allclose([l for _, l in b], [l for _, l in a], rtol=1e-5)
    pa, pb = hf_params(one / "student"), hf_params(many / "student")
    assert sorted(pa) == sorted(pb)
    for k in pa:
        np.testing.assert_allclose(pb[k], pa[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_grpo_step_on_2_processes_equals_one_process(setup, tmp_path):
    kw = dict(**{"data.source": str(setup / "problems.jsonl"), "data.valid": 0, "data.test": 2, "train.steps": 1,
                 "train.batch_size": 4, "grpo.num_generations": 2, "grpo.max_new_tokens": 6, "grpo.system": ""})
    launch(WORKER, 1, "grpo", fields(setup, tmp_path / "one", **kw))
    launch(WORKER, 2, "grpo", fields(setup, tmp_path / "two", **kw))
    rows = lambda out: [json.loads(line) for line in open(out / "metrics.jsonl")]
    one, two = rows(tmp_path / "one"), rows(tmp_path / "two")
    assert len(one) == len(two) == 1
    for k in ("loss", "grad_norm", "reward_total", "kl"):
        assert two[0][k] == pytest.approx(one[0][k], rel=1e-5, abs=1e-8), k


def test_each_process_places_its_own_rows_and_together_all(setup):
    for n in (2, 4):
        outs = [json.loads(line[5:]) for out in launch(ROWS, n) for line in out.splitlines()
                if line.startswith("ROWS=")]
        rows = [set(o["rows"]) for o in outs]
        assert len(rows) == n and set().union(*rows) == set(range(16))
        assert sum(map(len, rows)) == 16  # disjoint
        for o in outs:
            assert o["rows"] == list(range(*o["slice"]))  # process_rows names exactly the rows placed
