"""kdjax's KD step beside the PyTorch step a user would run instead, on this machine's CPU, in one call.

The anchor is ../shared/bench/torch_kd.py's `kd_hf` step moved to the CPU: transformers' Qwen2 with
random weights, sdpa attention, full [B, T, V] logits, softmax forward KL (MiniLLM's soft
cross-entropy), AdamW. kdjax's side is bench/kd_step.py on the same shapes and dtype: the chunked,
vocabulary-sharded loss, AdamW with clipping, kdjax's einsum attention, no remat.

Each side runs in its own process (two 2-billion-parameter setups do not fit in memory together),
the sides alternate for `--rounds` rounds, and each round times `--steps` steps after `--warmup`
untimed ones; the figure of a side is the median over all its timed steps. Timings on a shared
machine are noisy: the alternation puts both sides under the same conditions, and the ratio
(kdjax / PyTorch tokens/s) is the result to quote. One JSON line a process, then a summary line:

  python bench/cpu_kd_vs_torch.py                          # fp32, 0.5B <- 1.5B, 2 x 256 (issue 9)
  python bench/cpu_kd_vs_torch.py --dtype=bfloat16         # bf16 weights and compute on both sides
  python bench/cpu_kd_vs_torch.py --student=tiny-qwen2 --teacher=tiny-qwen2 --batch=2 --seq=32
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--student", default="qwen2.5-0.5b", help="kdjax ModelConfig preset (both sides)")
    ap.add_argument("--teacher", default="qwen2.5-1.5b")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="weights, AdamW moments and compute, both sides")
    ap.add_argument("--chunk_size", type=int, default=256, help="kdjax's loss chunk (tokens)")
    ap.add_argument("--rounds", type=int, default=2, help="alternations torch, kdjax")
    ap.add_argument("--steps", type=int, default=3, help="timed steps a round")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps a round (after kdjax's compile)")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    ap.add_argument("--xla_flags", default="", help="also run kdjax's side with these XLA_FLAGS (a third side, "
                    "e.g. --xla_cpu_use_onednn=true), interleaved with the other two")
    ap.add_argument("--side", choices=["torch", "kdjax"], help=argparse.SUPPRESS)  # one side, in this process
    return ap.parse_args(argv)


# ---- the PyTorch side (the anchor's kd_hf step, on the CPU) -----------------------------------
def hf_model(preset: str, dtype):
    """transformers' model of a kdjax preset's shape (Qwen2 or Llama), random weights, sdpa attention."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from kdjax.config import ModelConfig
    hf = ModelConfig.preset(preset).to_hf()
    config = AutoConfig.for_model(hf.pop("model_type"), **hf)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return model.to(dtype=dtype)


def torch_side(a) -> dict:
    import torch
    import torch.nn.functional as F
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[a.dtype]
    student, teacher = hf_model(a.student, dtype), hf_model(a.teacher, dtype).eval()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
    vocab = min(student.config.vocab_size, teacher.config.vocab_size)
    ids = torch.randint(0, vocab, (a.batch, a.seq))
    mask = torch.ones_like(ids)

    def step():  # ../shared/bench/torch_kd.py kd_hf, then AdamW
        with torch.no_grad():
            t_logits = teacher(input_ids=ids).logits
        s_logits = student(input_ids=ids).logits
        t_probs = F.softmax(t_logits, dim=-1, dtype=torch.float32)
        logp = F.log_softmax(s_logits, dim=-1, dtype=torch.float32)
        x = (t_probs * logp).sum(-1).view(-1)
        m = mask.view(-1).float()
        loss = -(x * m).sum() / m.sum()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    times = []
    for i in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        loss = step()
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
    return dict(side="torch", torch=torch.__version__, threads=torch.get_num_threads(), times=times, loss=loss)


# ---- kdjax's side (bench/kd_step.py) ----------------------------------------------------------
def kdjax_side(a) -> dict:
    import jax
    sys.path.insert(0, HERE)
    import kd_step
    args = [f"--student={a.student}", f"--teacher={a.teacher}", f"--batch={a.batch}", f"--seq={a.seq}",
            f"--dtype={a.dtype}", f"--param_dtype={a.dtype}", f"--teacher_param_dtype={a.dtype}", "--attention=xla",
            f"--chunk_size={a.chunk_size}", "--no-remat", f"--steps={a.steps}", f"--warmup={a.warmup}", "--num_devices=1"]
    r = kd_step.main(args, quiet=True)
    return dict(side="kdjax", jax=jax.__version__, times=r["step_times"], loss=r["loss"], compile_s=r["compile_s"])


def run_side(a, side: str, xla_flags: str = "") -> dict:
    """One side in a fresh process: its JSON line."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user's run (the tests simulate 8)
    if xla_flags:
        env["XLA_FLAGS"] = xla_flags
    argv = [sys.executable, os.path.abspath(__file__), f"--side={side}"] + [
        f"--{k}={v}" for k, v in vars(a).items() if k not in ("side", "xla_flags") and v is not None]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode or not lines:
        raise SystemExit(f"the {side} side failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def main(argv=None):
    a = parse_args(argv)
    if a.side:
        out = torch_side(a) if a.side == "torch" else kdjax_side(a)
        print(json.dumps(out), flush=True)
        return out
    tokens = a.batch * a.seq
    sides = [("torch", "torch", ""), ("kdjax", "kdjax", "")] + (
        [(f"kdjax {a.xla_flags}", "kdjax", a.xla_flags)] if a.xla_flags else [])
    times = {name: [] for name, _, _ in sides}
    for r in range(a.rounds):
        for name, side, flags in sides:
            line = run_side(a, side, flags)
            times[name] += line["times"]
            print(json.dumps(dict(line, side=name, round=r,
                                  tokens_per_s=round(tokens / statistics.median(line["times"]), 2))), flush=True)
    rate = {s: tokens / statistics.median(t) for s, t in times.items()}
    summary = dict(bench="cpu_kd_vs_torch", student=a.student, teacher=a.teacher, batch=a.batch, seq=a.seq,
                   dtype=a.dtype, chunk_size=a.chunk_size, rounds=a.rounds, steps=a.steps, cpus=os.cpu_count(),
                   date=datetime.date.today().isoformat(),
                   torch_tokens_per_s=round(rate["torch"], 2), kdjax_tokens_per_s=round(rate["kdjax"], 2),
                   ratio=round(rate["kdjax"] / rate["torch"], 3),
                   step_s={k: [round(t, 3) for t in v] for k, v in times.items()})
    if a.xla_flags:
        summary.update(xla_flags=a.xla_flags, kdjax_flags_tokens_per_s=round(rate[sides[2][0]], 2),
                       ratio_flags=round(rate[sides[2][0]] / rate["torch"], 3))
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
