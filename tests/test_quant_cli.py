"""`kdjax quantize` and `kdjax export` end to end, on a tiny random Qwen2 with SmolLM2's tokenizer.

The CLI runs in a subprocess (`python -m kdjax ...`); what it writes is checked against the same
quantization done here in-process, from calibration rows rebuilt by the documented protocol
(train split of the stdlib pairs, token streams joined and cut into windows).
"""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import kdjax
from kdjax import data, gguf_io
from kdjax.config import ModelConfig
from kdjax.quant import load_gptq, quantize_model, read_gptq, to_int4_model

from test_quant_common import logits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAIRS, HELD_OUT, CALIB_ROWS, CALIB_LEN = 60, 6, 8, 64
QUANT_FLAGS = ["--method=gptq", "--group_size=32", "--desc_act", f"--stdlib_pairs={PAIRS}",
               f"--eval_samples={HELD_OUT}", f"--calib_samples={CALIB_ROWS}", f"--calib_length={CALIB_LEN}",
               "--float_dtype=float32", "--eval_length=64"]


def kdjax_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "kdjax", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))


def ok(proc):
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(float model, tokenizer, kdjax checkpoint dir): tiny-qwen2 dims with SmolLM2's 49,152 vocabulary."""
    tokenizer = gguf_io.read_gguf(gguf_io.preset_path("smollm2-135m-instruct"))[2]
    cfg = ModelConfig.preset("tiny-qwen2").replace(vocab_size=49152, eos_token_id=tokenizer.eos_token_id)
    model = kdjax.Qwen2(cfg, seed=3)
    src = str(tmp_path_factory.mktemp("tiny") / "float")
    kdjax.save(model, src, format="kdjax", tokenizer=tokenizer)
    return model, tokenizer, src


@pytest.fixture(scope="module")
def quantized(tiny, tmp_path_factory):
    """The CLI's GPTQ directory (with --report) and its stdout."""
    _, _, src = tiny
    out = str(tmp_path_factory.mktemp("q") / "gptq")
    proc = ok(kdjax_cli("quantize", f"--model={src}", f"--out={out}", *QUANT_FLAGS, "--report",
                        "--rouge_samples=2", "--max_new_tokens=4"))
    return out, proc.stdout


def calibration_ids(tokenizer):
    """The calibration windows, rebuilt independently of the command's code."""
    records = data.python_function_records(limit=PAIRS)
    train = data.split_records(records, seed=1234, valid=0, test=HELD_OUT)["train"]
    stream = []
    for ex in data.tokenize(train, tokenizer, max_length=CALIB_LEN, on_long_prompt="skip"):
        stream += list(ex.prompt_ids) + list(ex.response_ids)
    assert len(stream) >= CALIB_ROWS * CALIB_LEN
    return np.asarray(stream[:CALIB_ROWS * CALIB_LEN], np.int32).reshape(CALIB_ROWS, CALIB_LEN)


def test_help_of_both_commands():
    q = ok(kdjax_cli("quantize", "--help", timeout=120)).stdout
    for flag in ("--method", "--group_size", "--[no]desc_act", "--calib_data", "--calib_samples", "--[no]report",
                 "--out"):
        assert flag in q
    e = ok(kdjax_cli("export", "--help", timeout=120)).stdout
    assert "--format" in e and "--group_size" in e and "bf16" in e


def test_quantize_writes_the_in_process_int4_model(tiny, quantized):
    model, tokenizer, _ = tiny
    out, stdout = quantized
    qm = quantize_model(model, calibration_ids(tokenizer), method="gptq", group_size=32, desc_act=True,
                        batch_size=16, mse=2.4)  # the command's default range search
    cfg, read, _ = read_gptq(out)
    assert read.method == "gptq" and read.group_size == 32 and read.desc_act and read.sym and read.mse == 2.4
    assert sorted(read.linears) == sorted(qm.linears)
    for path, q in qm.linears.items():
        r = read.linears[path]
        np.testing.assert_array_equal(r.codes, q.codes, err_msg=path)
        np.testing.assert_array_equal(r.g_idx, q.g_idx, err_msg=path)
        np.testing.assert_array_equal(np.asarray(r.scales, np.float16), np.asarray(q.scales, np.float16))

    ids = jax.random.randint(jax.random.key(0), (2, 24), 0, 49152)
    int4, _ = load_gptq(out)
    want = np.asarray(logits(to_int4_model(model, qm), ids))
    got = np.asarray(logits(int4, ids))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.abs(want - np.asarray(logits(model, ids))).max() > 1e-3  # the weights really are int4

    report = json.load(open(os.path.join(out, "quantize_report.json")))
    assert report["sizes"]["linears_packed_bytes"] == qm.nbytes()
    assert report["sizes"]["int4_disk_bytes"] == os.path.getsize(os.path.join(out, "model.safetensors"))
    assert report["float"]["perplexity"] > 1 and report["int4"]["perplexity"] > 1
    assert report["float"]["perplexity"] != report["int4"]["perplexity"]
    assert report["float"]["rouge_prompts"] == 2 and "rougeL" in report["int4"]
    assert "| perplexity" in stdout and "| size on disk" in stdout


def test_bad_group_size_is_a_usage_error(tiny, tmp_path):
    _, _, src = tiny
    proc = kdjax_cli("quantize", f"--model={src}", f"--out={tmp_path / 'q'}", "--method=rtn", "--group_size=48")
    assert proc.returncode != 0
    assert "--group_size=48 does not divide the input size 64" in proc.stderr
    assert "use --group_size=32" in proc.stderr and "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "q" / "model.safetensors")


def test_export_gptq_repacks_and_hf_is_bf16(tiny, quantized, tmp_path):
    model, _, src = tiny
    out, _ = quantized
    ok(kdjax_cli("export", "--format=gptq", f"--model={out}", f"--out={tmp_path / 'again'}"))
    _, a, _ = read_gptq(out)
    _, b, _ = read_gptq(str(tmp_path / "again"))
    for path, q in a.linears.items():
        for field in ("codes", "zeros", "scales", "g_idx"):
            np.testing.assert_array_equal(getattr(b.linears[path], field), getattr(q, field))

    ok(kdjax_cli("export", "--format=hf", f"--model={src}", f"--out={tmp_path / 'hf'}"))
    with open(tmp_path / "hf" / "config.json") as f:
        assert json.load(f)["torch_dtype"] == "bfloat16"
    back, tok = kdjax.load(str(tmp_path / "hf"))
    assert tok is not None
    ids = jax.random.randint(jax.random.key(1), (2, 16), 0, 49152)
    want, got = np.asarray(logits(model, ids)), np.asarray(logits(back, ids))
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()  # bf16 rounding of the weights
    assert np.abs(got - want).max() > 0  # and they were rounded
