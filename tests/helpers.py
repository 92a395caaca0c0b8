"""Helpers shared by the trainer tests (no tests here)."""
import os
import signal
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def set_fields(c, **kw):
    """c with dotted fields set: set_fields(cfg, **{"train.lr": 0.1, "resume": True})."""
    from kdjax.train_config import override
    return override(c, kw)


def layer_states_error(student, teacher, rows, layer_map) -> float:
    """float64 numpy reference of losses.hidden_state_loss: the mean over the real tokens of `rows`
    (segment_ids > 0) of the mean over student layers of ||s - t||^2 / ||t||^2, each student layer
    against the teacher layer `layer_map` pairs it with."""
    import numpy as np
    _, s_states = student.hidden_states(rows["input_ids"], positions=rows["positions"], layers=True)
    _, t_states = teacher.hidden_states(rows["input_ids"], positions=rows["positions"], layers=True)
    real = np.asarray(rows["segment_ids"]) > 0
    return np.mean([np.sum((np.asarray(a, np.float64) - np.asarray(t_states[j], np.float64)) ** 2, -1)[real]
                    / np.sum(np.asarray(t_states[j], np.float64) ** 2, -1)[real]
                    for a, j in zip(s_states, layer_map)], axis=0).mean()


def sigkill_at(argv, line_start: str):
    """Runs argv from the repository root and SIGKILLs it when a line of its output starts with
    line_start (a step's progress line); asserts that it died of that signal there."""
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    killed = False
    for line in proc.stdout:
        if line.startswith(line_start):
            proc.send_signal(signal.SIGKILL)
            killed = True
            break
    proc.wait(timeout=60)
    assert killed and proc.returncode == -signal.SIGKILL, (line_start, proc.returncode)


def run_kdjax(*args, timeout=600):
    """`python -m kdjax ARGS` from the repository root; the CompletedProcess (text output)."""
    return subprocess.run([sys.executable, "-m", "kdjax", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def write_tiny_run(root):
    """A tiny teacher (4-layer Llama, SmolLM2's tokenizer) in root/teacher, 40 prompt -> response
    records in root/p.jsonl and 16 problems with tests in root/problems.jsonl; returns root."""
    import kdjax
    from kdjax import data, gguf_io
    from kdjax.config import ModelConfig
    _, _, tok = gguf_io.read_gguf(gguf_io.preset_path("smollm2-135m-instruct"))
    cfg = ModelConfig.preset("tiny-llama", vocab_size=300, num_layers=4, max_position_embeddings=128)
    kdjax.save(kdjax.Qwen2(cfg, seed=1), str(root / "teacher"), format="kdjax", tokenizer=tok)
    data.save_records([data.Record(prompt=f"f{i}", response=f"g{i} h{i}") for i in range(40)], str(root / "p.jsonl"))
    data.save_records([data.Record(prompt=f"f{i}", response=f"def f{i}(): return {i}", tests=(f"assert f{i}() == {i}",))
                       for i in range(16)], str(root / "problems.jsonl"))
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script, n: int, *args, timeout=900):
    """`python -c script PROCESS_ID N ARGS` in n processes on localhost (8 / n simulated CPU devices
    each, $COORDINATOR set for jax.distributed); their outputs, in process order."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", COORDINATOR=f"127.0.0.1:{free_port()}",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={8 // n}")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(i), str(n), *args], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(n)]
    outs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        assert p.returncode == 0, err[-4000:]
        outs.append(out)
    return outs


class Crash(Exception):
    """What `crash_at` raises: the process dying in the middle of a run."""


def crash_at(monkeypatch, module, step: int):
    """module.fit (the loop, as the trainer `module` calls it) raises Crash when a run that is not
    resumed asks for the batch of `step` (0-based); returns the real fit (to set back)."""
    real_fit = module.fit

    def crashing_fit(cfg, task, run):
        inner = task.batches

        class Batches:
            examples, rows = inner.examples, inner.rows

            def __call__(self, at, model):
                if at == step and not cfg.resume:
                    raise Crash()
                return inner(at, model)
        task.batches = Batches()
        return real_fit(cfg, task, run)
    monkeypatch.setattr(module, "fit", crashing_fit)
    return real_fit
