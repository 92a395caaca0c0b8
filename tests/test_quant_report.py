"""`kdjax quantize` from Python (kdjax.quant.report, kdjax.quant.calibration), on a tiny random Qwen3
with SmolLM2's tokenizer: calibration windows, sizes and the report's perplexity against plain
recomputations, and errors that name the option."""
import json
import os
import warnings

import jax
import numpy as np
import pytest
from flax import nnx

import kdjax
from kdjax import data, gguf_io
from kdjax.config import ModelConfig
from kdjax.quant import QuantizeOptions, calibration_ids, quantize_model, quantize_with_report, read_gptq
from kdjax.quant.report import check_inputs


@pytest.fixture(scope="module")
def tok():
    return gguf_io.read_gguf(gguf_io.preset_path("smollm2-135m-instruct"))[2]


@pytest.fixture(scope="module")
def records():
    return data.python_function_records(limit=40)


@pytest.fixture(scope="module")
def model(tok):
    cfg = ModelConfig.preset("tiny-qwen3").replace(vocab_size=49152, eos_token_id=tok.eos_token_id)
    return kdjax.CausalLM(cfg, seed=3)


def token_stream(records, tok, length):
    with warnings.catch_warnings():  # responses cut to the row length: expected
        warnings.simplefilter("ignore")
        examples = data.tokenize(records, tok, max_length=length, on_long_prompt="skip")
    return [t for ex in examples for t in list(ex.prompt_ids) + list(ex.response_ids)]


def test_calibration_ids_are_the_records_token_stream_cut_into_rows(tok, records):
    stream = token_stream(records, tok, 64)
    ids = calibration_ids(records, tok, num_rows=3, length=64, template="minillm")
    assert ids.dtype == np.int32 and ids.shape == (3, 64)
    np.testing.assert_array_equal(ids.ravel(), stream[:3 * 64])
    every = calibration_ids(records, tok, num_rows=10 ** 6, length=64, template="minillm")  # all tokens there are
    assert every.shape[0] > 3
    assert every.shape == (len(stream) // 64, 64)
    np.testing.assert_array_equal(every.ravel(), stream[:every.size])
    with pytest.raises(ValueError, match=r"1 records give \d+ tokens, fewer than one row of length=4096"):
        calibration_ids(records[:1], tok, num_rows=1, length=4096, template="minillm")


def test_quantize_with_report_writes_what_plain_recomputation_gives(tmp_path, tok, records, model):
    opts = QuantizeOptions(method="rtn", group_size=32, eval_samples=4, eval_length=64, report=True,
                           float_dtype="float32")
    lines = []
    result = quantize_with_report(model, tok, str(tmp_path), records, opts, source="tiny", log=lines.append)
    assert lines[0] == "quantizing the 7 linears of 2 layers: rtn, 4 bits, group 32, sym"

    want = quantize_model(model, method="rtn", group_size=32)
    _, written, _ = read_gptq(str(tmp_path))
    assert written.mse == 0.0  # RTN's default: no range search (GPTQ's is 2.4: test_quant_cli.py)
    for path, q in want.linears.items():
        np.testing.assert_array_equal(written.linears[path].codes, q.codes, err_msg=path)

    sizes = result["sizes"]
    n = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model)))
    assert sizes["params"] == n and sizes["float32_memory_bytes"] == 4 * n
    assert sizes["linears_packed_bytes"] == want.nbytes()
    assert sizes["int4_disk_bytes"] == os.path.getsize(tmp_path / "model.safetensors")
    assert sizes["int4_memory_bytes"] == want.nbytes() + 4 * (n - sizes["linear_params"])  # float32 rest

    # The float perplexity: a plain forward on the trainer's test split, float64 log-softmax.
    held_out = data.split_records(records, seed=opts.split_seed, valid=0, test=4)["test"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = data.make_rows(held_out, tok, max_length=64, on_long_prompt="skip")
    logits = np.asarray(model(rows["input_ids"], segment_ids=rows["segment_ids"], positions=rows["positions"]),
                        np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, np.asarray(rows["targets"])[..., None], -1)[..., 0]
    mask = np.asarray(rows["loss_mask"]) > 0
    ppl = float(np.exp(nll[mask].mean()))
    report = json.load(open(tmp_path / "quantize_report.json"))
    assert report["float"]["num_tokens"] == mask.sum()
    assert abs(report["float"]["perplexity"] - ppl) < 1e-4 * ppl
    assert report["int4"]["perplexity"] != report["float"]["perplexity"]
    assert report["source"] == "tiny" and report["sizes"] == sizes
    assert (tmp_path / "quantize_report.md").read_text() == result["table"]
    assert f"| {report['float']['perplexity']:.3f} | {report['int4']['perplexity']:.3f} |" in result["table"]


def test_bad_options_and_inputs_name_the_option(tok, records, model):
    with pytest.raises(ValueError, match=r"^--bits=3: GPTQ packing supports \(2, 4, 8\)"):
        QuantizeOptions(bits=3).check(prefix="--")
    with pytest.raises(ValueError, match=r"^--mse=-2.0: expected -1 \(2.4 for GPTQ, 0 for RTN\)"):
        QuantizeOptions(mse=-2.0).check(prefix="--")
    with pytest.raises(ValueError, match=r"^rouge_samples=5: expected 0 \.\. eval_samples=2"):
        QuantizeOptions(eval_samples=2, rouge_samples=5).check()
    with pytest.raises(ValueError, match=r"^--eval_samples=0: must be >= 0, and >= 1 for the report"):
        QuantizeOptions(eval_samples=0, report=True).check(prefix="--")
    with pytest.raises(ValueError, match=r"^--group_size=48 does not divide the input size 64 .*use --group_size=32"):
        check_inputs(model, tok, records, QuantizeOptions(group_size=48), prefix="--")
    with pytest.raises(ValueError, match="no tokenizer"):
        check_inputs(model, None, records, QuantizeOptions(group_size=32))
    with pytest.raises(ValueError, match=r"3 records are too few for eval_samples=48"):
        check_inputs(model, tok, records[:3], QuantizeOptions(group_size=32))
    check_inputs(model, None, [], QuantizeOptions(method="rtn", group_size=32))  # RTN alone needs no data
