"""configs/*.py: each loads through ml_collections' config flag as `kdjax distill --config=...`
does, has exactly the base config's fields with their types and valid values, the lr / model
arguments work, variants differ from their reference run only where they should; the CLI lists
--config and names a misspelt override field; launch/gpu.sh and launch/tpu_pod.sh hand their
arguments to kdjax intact."""
import glob
import json
import os
import shlex
import signal
import subprocess
import sys
import time

import jax
import pytest
from absl import flags
from ml_collections import config_flags

from kdjax import data, grpo_config, losses, train_config
from kdjax.training import models, rewards
from kdjax.sharding import make_mesh

pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")  # ml_collections' loader

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                 if not os.path.basename(p).startswith("_"))
LR_SWEEP = ("5e-4", "1e-4", "5e-5", "1e-5", "5e-6")  # the values configs/README.md documents
DTYPES = ("float32", "bfloat16")


def load(spec: str, *overrides: str):
    """`--config=spec` (+ `--config.x=y` overrides) parsed by a fresh flag, as the CLI's is defined;
    spec is relative to the repository root, with an optional `:argument`."""
    argv = ["kdjax", f"--config={os.path.join(ROOT, spec)}", *overrides]
    fv = flags.FlagValues()
    # sys_argv: the flag registers the --config.x overrides it finds there (the CLI's sees sys.argv).
    config_flags.DEFINE_config_file("config", train_config.__file__, "", flag_values=fv, sys_argv=argv)
    fv(argv)
    return fv.config


def flat(cfg, prefix=""):
    out = {}
    for k, v in cfg.items():
        if hasattr(v, "items"):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_configs_exist():
    names = {os.path.basename(p) for p in CONFIGS}
    assert {"default.py", "dolly_en_kd.py", "dolly_en_rkl.py", "dolly_es_sft.py", "dolly_es_kd.py",
            "bugnet_kd.py", "pytorrent_kd.py"} <= names


@pytest.mark.parametrize("path", CONFIGS)
def test_config_fields_types_and_values(path):
    cfg = flat(load(path))
    base = flat((grpo_config if cfg["mode"] == "grpo" else train_config).get_config())
    extra, missing = sorted(set(cfg) - set(base)), sorted(set(base) - set(cfg))
    assert not extra, f"{path}: fields not in kdjax/train_config.py (misspelt?): {extra}"
    assert not missing, f"{path}: fields of the base config missing: {missing}"
    for key, value in cfg.items():
        assert type(value) is type(base[key]), f"{path}: {key}={value!r} is {type(value).__name__}, " \
                                               f"the base has {type(base[key]).__name__}"

    assert cfg["mode"] in ("distill", "sft", "gkd", "minillm", "grpo")
    if cfg["mode"] == "grpo":
        assert cfg["grpo.num_generations"] >= 2 and cfg["grpo.beta"] >= 0 and cfg["grpo.temperature"] > 0
        assert {k[len("grpo.weights."):] for k in cfg if k.startswith("grpo.weights.")} <= set(rewards.REWARDS)
        assert cfg["data.layout"] in ("mbpp", "humaneval", "records")  # problems with tests
    assert cfg["dtype"] in DTYPES and cfg["param_dtype"] in DTYPES
    assert cfg["kd.divergence"] in losses.DIVERGENCES
    losses.per_token_divergence(cfg["kd.divergence"], beta=cfg["kd.beta"], alpha=cfg["kd.alpha"])  # range checks
    assert cfg["kd.temperature"] > 0 and 0 <= cfg["kd.kd_ratio"] <= 1 and cfg["kd.chunk_size"] > 0
    assert cfg["data.layout"] in data.LAYOUTS
    assert cfg["data.template"] in data.TEMPLATES
    source = cfg["data.source"]
    hub = data.LAYOUTS[cfg["data.layout"]].hub
    if source and not source.endswith((".jsonl", ".json", ".parquet", ".gz")):
        # A hub name must be the layout's own dataset, so that its config and split are the ones used.
        assert hub is not None and source == hub[0], f"{path}: data.source={source!r} is neither a local " \
                                                     f"file nor the {cfg['data.layout']!r} layout's dataset {hub}"
    t = {k[6:]: v for k, v in cfg.items() if k.startswith("train.")}
    assert t["steps"] > t["warmup_steps"] >= 0 and t["lr"] > 0 and 0 <= t["min_lr_ratio"] <= 1
    assert t["batch_size"] % t["grad_accum"] == 0
    assert 0 < t["checkpoint_every"] <= t["steps"] and 0 <= t["eval_every"] <= t["steps"]
    assert [int(s) for s in cfg["eval.seeds"].split(",")]
    assert cfg["eval.temperature"] >= 0 and 0 < cfg["eval.top_p"] <= 1
    if cfg["mode"] == "distill" and not cfg["student"]:  # a student made of the teacher's layers
        models.parse_layers(cfg["student_layers"], 30)  # SmolLM2-135M has 30

    # The mesh on one device, and for the accelerator runs on 8 (the simulated CPU host here, an
    # 8-GPU host there), with the trainer's rule that a micro-batch splits over data * fsdp devices.
    for n in (1,) if path.startswith("configs/default") else (1, 8):  # the default job and its sweep: CPU
        mesh = make_mesh(cfg["mesh.data"], cfg["mesh.fsdp"], cfg["mesh.tensor"], devices=jax.devices()[:n])
        assert mesh.size == n
        micro = t["batch_size"] // t["grad_accum"]
        assert micro % (mesh.shape["data"] * mesh.shape["fsdp"]) == 0, f"{path}: {micro} rows on {dict(mesh.shape)}"


def test_default_file_is_the_embedded_default():
    from kdjax import distill_config
    assert load("configs/default.py").to_dict() == distill_config.get_config().to_dict()
    # the default job is the neutral config plus its recipe, nothing else
    job, base = flat(distill_config.get_config()), flat(train_config.get_config())
    assert {k for k in job if job[k] != base[k]} == {"teacher_sft.steps", "kd.hidden_weight", "dtype",
                                                          "eval.batch_size", "train.eval_every"}


@pytest.mark.parametrize("name", ["dolly_en_kd", "dolly_en_rkl", "dolly_en_jsd", "dolly_es_kd", "bugnet_kd",
                                  "pytorrent_kd"])
def test_lr_sweep_argument(name):
    path = f"configs/{name}.py"
    default = load(path)
    dirs = set()
    for lr in LR_SWEEP:
        cfg = load(f"{path}:{lr}")
        assert cfg.train.lr == float(lr)
        # Only the lr and the run directory change with the argument.
        changed = {k for k, v in flat(cfg).items() if v != flat(default)[k]}
        assert changed <= {"train.lr", "out_dir"}, changed
        dirs.add(cfg.out_dir)
    assert len(dirs) == len(LR_SWEEP) and all(name in d for d in dirs)  # one directory per run
    for bad in ("abc", "-1", "0"):
        with pytest.raises(flags.IllegalFlagValueError, match=rf"{name}\.py:{bad}: .*learning rate"):
            load(f"{path}:{bad}")


def test_sweep_values_documented():
    readme = open(os.path.join(ROOT, "configs", "README.md")).read()
    for lr in LR_SWEEP:
        assert lr in readme
    for path in CONFIGS:
        assert os.path.basename(path) in readme, f"configs/README.md does not describe {path}"


def test_variants_differ_only_where_they_should():
    en = flat(load("configs/dolly_en_kd.py"))

    def diff(path):
        return {k for k, v in flat(load(path)).items() if v != en[k]}

    assert diff("configs/dolly_en_rkl.py") == {"out_dir", "kd.divergence"}
    assert diff("configs/dolly_en_jsd.py") <= {"out_dir", "kd.divergence", "kd.beta"}
    assert diff("configs/dolly_es_kd.py") == {"out_dir", "teacher", "data.source", "data.layout"}
    es_kd = flat(load("configs/dolly_es_kd.py"))
    for arg, model in (("teacher", "Qwen/Qwen2.5-3B-Instruct"), ("student", "Qwen/Qwen2.5-0.5B-Instruct")):
        sft = flat(load(f"configs/dolly_es_sft.py:{arg}"))
        assert sft["mode"] == "sft" and sft["teacher"] == model
        # The SFT runs differ from the KD run in what they learn from, not in data or schedule.
        assert {k for k, v in sft.items() if v != es_kd[k]} <= {"mode", "out_dir", "teacher", "student"}
    # The KD run's default teacher is what `kdjax sft --config=configs/dolly_es_sft.py` writes.
    assert es_kd["teacher"] == os.path.join(load("configs/dolly_es_sft.py").out_dir, "sft")
    cfg = load("configs/dolly_es_sft.py:student,5e-5")
    assert cfg.train.lr == 5e-5 and cfg.teacher.endswith("0.5B-Instruct") and cfg.out_dir.endswith("lr5e-05")
    with pytest.raises(flags.IllegalFlagValueError, match="MODEL or MODEL,LR"):
        load("configs/dolly_es_sft.py:studnet")


def test_overrides_apply_after_the_argument():
    cfg = load("configs/dolly_en_kd.py:5e-5", "--config.train.steps=7", "--config.kd.divergence=reverse_kl",
               "--config.data.source=/tmp/dolly.jsonl")
    assert (cfg.train.lr, cfg.train.steps, cfg.kd.divergence, cfg.data.source) == (5e-5, 7, "reverse_kl",
                                                                                   "/tmp/dolly.jsonl")
    with pytest.raises(flags.IllegalFlagValueError, match="steps"):
        load("configs/dolly_en_kd.py", "--config.train.steps=abc")


def _kdjax(*args, prelude=""):
    code = f"import sys\n{prelude}\nfrom kdjax.cli import main\nsys.exit(main(['kdjax', *sys.argv[1:]]))"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_cli_help_lists_config():
    out = _kdjax("distill", "--help")
    assert out.returncode == 0, out.stderr
    assert "--config:" in out.stdout and "resume:" in out.stdout


@pytest.mark.parametrize("args, expected", [
    (["--config=configs/default.py", "--config.train.stpes=3"],
     '--config.train.stpes: the config has no field \'stpes\'. Did you mean "steps" instead of "stpes"?'),
    (["--config.trian.steps=3"], "--config.trian.steps: the config has no field 'trian'."),
    (["--config.train.steps=abc"], "--config.train.steps=abc: invalid literal for int()"),
    (["--config=configs/nope.py"], "No such file or directory: 'configs/nope.py'"),
])
def test_cli_bad_config_flag_is_one_line_naming_it(args, expected):
    out = subprocess.run([sys.executable, "-m", "kdjax", "distill", *args], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2
    assert expected in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "data:" not in out.stdout  # stopped before loading anything


def test_cli_runs_a_config_file_with_argument_overrides_and_resume():
    # The real command line up to the trainer, which is replaced by a dump of the config it gets.
    prelude = ("import kdjax.training.run as r\n"
               "r.run = lambda cfg, mode, overwrite=False: print('CONFIG=' + cfg.to_json())")
    out = _kdjax("sft", "--config=configs/dolly_es_sft.py:student,5e-5", "--config.train.steps=7", "--resume",
                 prelude=prelude)
    assert out.returncode == 0, out.stderr[-2000:]
    line = next(l for l in out.stdout.splitlines() if l.startswith("CONFIG="))
    cfg = json.loads(line[len("CONFIG="):])
    assert cfg["mode"] == "sft" and cfg["resume"] is True
    assert cfg["train"]["lr"] == 5e-5 and cfg["train"]["steps"] == 7
    assert cfg["teacher"] == "Qwen/Qwen2.5-0.5B-Instruct" and cfg["data"]["layout"] == "dolly_es"


# ---- launch/ scripts: their arguments reach kdjax intact ------------------------------------------

STUB = """#!/usr/bin/env python3
import json, os, sys, time
if sys.argv[1:3] == ["-c", "import jax; print(jax.default_backend(), jax.device_count())"]:
    print(os.environ.get("STUB_BACKEND", "gpu 8"))
    sys.exit(0)
print("ARGV=" + json.dumps(sys.argv[1:]))
print("ENV=" + json.dumps({k: os.environ.get(k) for k in ("XLA_PYTHON_CLIENT_MEM_FRACTION", "PYTHONPATH", "FOO")}))
if "--config.train.steps=999" in sys.argv:
    time.sleep(60)
"""
TRICKY = "--config.out_dir=/mnt/a b'c\"d$HOME"


def _stub(path):
    path.write_text(STUB)
    path.chmod(0o755)
    return str(path)


def _marked(stdout, key):
    return json.loads(next(l for l in stdout.splitlines() if l.startswith(key + "="))[len(key) + 1:])


def test_gpu_script(tmp_path):
    env = dict(os.environ, PYTHON=_stub(tmp_path / "python"))
    env.pop("XLA_PYTHON_CLIENT_MEM_FRACTION", None)
    out = subprocess.run(["launch/gpu.sh", "sft", "--config=configs/dolly_es_sft.py:student", TRICKY, "--resume"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert _marked(out.stdout, "ARGV") == ["-m", "kdjax", "sft", "--config=configs/dolly_es_sft.py:student", TRICKY,
                                           "--resume"]
    seen = _marked(out.stdout, "ENV")
    assert seen["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.92" and seen["PYTHONPATH"].split(":")[0] == ROOT
    assert "8 GPU(s)" in out.stderr

    cpu = subprocess.run(["launch/gpu.sh", "--config=configs/dolly_en_kd.py"], cwd=ROOT, capture_output=True,
                         env={**env, "STUB_BACKEND": "cpu 8"}, text=True, timeout=60)
    assert cpu.returncode == 1 and "finds no GPU" in cpu.stderr and "ARGV=" not in cpu.stdout
    bad = subprocess.run(["launch/gpu.sh", "distill", "configs/dolly_en_kd.py"], cwd=ROOT, capture_output=True,
                         env=env, text=True, timeout=60)
    assert bad.returncode == 2 and "every option is a --flag" in bad.stderr


def _pod_command(*args, **env):
    """The command tpu_pod.sh would run on every worker (DRY_RUN=1 prints the gcloud line)."""
    out = subprocess.run(["launch/tpu_pod.sh", *args], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "DRY_RUN": "1", "TPU_NAME": "pod", "ZONE": "z", **env})
    assert out.returncode == 0, out.stderr
    words = shlex.split(out.stdout.rstrip("\n").splitlines()[-1])
    assert words[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod"] and "--worker=all" in words
    return next(w for w in words if w.startswith("--command="))[len("--command="):]


def test_tpu_pod_script_runs_the_same_command_on_every_worker(tmp_path):
    # A stand-in for a worker's home: ~/kdjax with .venv/bin/python; the command runs in bash there.
    (tmp_path / "kdjax" / ".venv" / "bin").mkdir(parents=True)
    _stub(tmp_path / "kdjax" / ".venv" / "bin" / "python")
    remote = _pod_command("distill", "--config=configs/dolly_en_kd.py:5e-5", TRICKY, "--resume",
                          REMOTE_ENV="FOO=bar")
    out = subprocess.run(["bash", "-c", remote], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    argv = _marked(out.stdout, "ARGV")  # --distributed: jax.distributed.initialize() joins the workers
    assert argv == ["-m", "kdjax", "distill", "--distributed", "--config=configs/dolly_en_kd.py:5e-5", TRICKY,
                    "--resume"]
    assert _marked(out.stdout, "ENV")["FOO"] == "bar"
    assert "ARGV=" in (tmp_path / "kdjax" / "kdjax-distill.log").read_text()

    # DETACH=1 starts the run in the background with its pid in kdjax.pid; `stop` ends it.
    remote = _pod_command("distill", "--config.train.steps=999", DETACH="1")
    out = subprocess.run(["bash", "-c", remote], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "started" in out.stdout, out.stderr
    pid = int((tmp_path / "kdjax" / "kdjax.pid").read_text())
    try:
        subprocess.run(["bash", "-c", _pod_command("stop")], cwd=tmp_path, check=True, timeout=60)
        assert _ended(pid), "stop left the detached run alive"
        assert not (tmp_path / "kdjax" / "kdjax.pid").exists()
    finally:
        if not _ended(pid, wait_s=0):
            os.kill(pid, signal.SIGKILL)


def _ended(pid, wait_s=5.0):
    """The process is gone or a zombie (waiting for init to reap it), within wait_s seconds."""
    deadline = time.time() + wait_s
    while True:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        if time.time() >= deadline:
            return False
        time.sleep(0.05)


def test_tpu_pod_plan_runs_kdjax_plan_here_for_the_slice(tmp_path):
    env = {**os.environ, "PYTHON": _stub(tmp_path / "python"), "ACCELERATOR_TYPE": "v5litepod-16"}
    env.pop("TPU_NAME", None)  # nothing is booked yet
    out = subprocess.run(["launch/tpu_pod.sh", "plan", "--config=configs/dolly_en_kd.py", TRICKY, "--search"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    assert _marked(out.stdout, "ARGV") == ["-m", "kdjax", "plan", "--topology=v5litepod-16",
                                           "--config=configs/dolly_en_kd.py", TRICKY, "--search"]
    env.pop("ACCELERATOR_TYPE")
    out = subprocess.run(["launch/tpu_pod.sh", "plan"], cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 2 and "ACCELERATOR_TYPE" in out.stderr


def test_gpu_hosts_script_starts_one_process_a_host(tmp_path):
    out = subprocess.run(["launch/gpu_hosts.sh", "--hosts=h0,h1,h2", "--port=2345", "--dry_run", "grpo",
                          "--config=configs/grpo_mbpp.py", TRICKY], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, env={**os.environ, "REMOTE_DIR": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 3
    for i, line in enumerate(lines):
        ssh, host, remote = shlex.split(line)
        assert (ssh, host) == ("ssh", f"h{i}")
        _stub(tmp_path / "python")
        run = subprocess.run(["bash", "-c", remote.replace(".venv/bin/python", "./python")], capture_output=True,
                             text=True, timeout=60)
        assert _marked(run.stdout, "ARGV") == [
            "-m", "kdjax", "grpo", "--distributed", "--coordinator=h0:2345", "--num_processes=3", f"--process_id={i}",
            "--config=configs/grpo_mbpp.py", TRICKY]
    one = subprocess.run(["launch/gpu_hosts.sh", "--coordinator=10.0.0.1", "--num_processes=2", "--process_id=1",
                          "--dry_run", "sft"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert one.returncode == 0 and "--coordinator=10.0.0.1:1234 --num_processes=2 --process_id=1" in one.stdout
    bad = subprocess.run(["launch/gpu_hosts.sh", "--coordinator=x", "--num_processes=2", "--process_id=2", "sft"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--process_id=2" in bad.stderr


def test_tpu_pod_script_refuses_bad_calls():
    run = lambda *a, **e: subprocess.run(["launch/tpu_pod.sh", *a], cwd=ROOT, capture_output=True, text=True,
                                         timeout=60, env={**os.environ, "DRY_RUN": "1", **e})
    out = run("distill", "--config=configs/default.py")
    assert out.returncode == 2 and "TPU_NAME" in out.stderr
    out = run("distill", "configs/default.py", TPU_NAME="pod")
    assert out.returncode == 2 and "unexpected argument" in out.stderr
