"""Quantize every decoder linear to int4 (RTN or GPTQ), write a GPTQ checkpoint, report the cost.

q/k/v/o/gate/up/down of every layer go onto the GPTQ int4 grid (kdjax.quant); embeddings, norms
and the output head stay float (stored in --float_dtype). --out becomes a GPTQ v1 directory
(model.safetensors with qweight/qzeros/scales/g_idx, config.json with quantization_config,
quantize_config.json, the tokenizer) that transformers + optimum + gptqmodel load. kdjax.load reads
float checkpoints only: in kdjax, read it with `int4_model, qm = kdjax.quant.load_gptq(DIR)`.

Data: GPTQ's calibration rows come from the train split of --calib_data (default: docstring -> code
pairs from the standard library), the report's held-out rows from its test split (split as the
trainer splits them, so it is the test set of `kdjax eval` and `kdjax distill` by default).
Always printed: size on disk and packed size in memory against float, time to quantize. --report
adds perplexity on the held-out response tokens before and after (the written checkpoint read back)
and, with --rouge_samples=N, greedy Rouge-L on N held-out prompts; written to
DIR/quantize_report.md and DIR/quantize_report.json.
"""
from __future__ import annotations

import json
import os
import time
import warnings

from absl import app, flags

from kdjax.train_config import get_config

_C = get_config()

flags.DEFINE_string("model", "smollm2-135m-instruct", "float model: HF directory, .gguf file, kdjax checkpoint or "
                    "preset name (for `kdjax export`: also a GPTQ directory)")
flags.DEFINE_string("out", None, "output directory", required=True)
flags.DEFINE_enum("method", "gptq", ["rtn", "gptq"], "rtn = round to nearest; gptq = Hessian-aware rounding on "
                  "calibration data (sequential over the layers)")
flags.DEFINE_integer("bits", 4, "bits per weight (2, 4 or 8; GPU kernels serve 4)")
flags.DEFINE_integer("group_size", 128, "input rows per scale/zero group (-1 = one group per output column); "
                     "must divide every linear's input size (SmolLM2-135M: 576 and 1536, so 64)")
flags.DEFINE_bool("sym", True, "symmetric grid (zero point fixed at 2**(bits-1)); --nosym fits a zero per group")
flags.DEFINE_bool("desc_act", True, "GPTQ act-order: quantize input rows by decreasing Hessian diagonal (on by "
                  "default: without it GPTQ turned SmolLM2's greedy code answers into prose, docs/quantization.md)")
flags.DEFINE_float("damp_percent", 0.01, "GPTQ dampening: this fraction of the mean Hessian diagonal is added")
flags.DEFINE_string("calib_data", None, "calibration / held-out records: a local .jsonl/.json/.parquet file (or a hub "
                    "dataset name) read with --calib_layout; default: --stdlib_pairs docstring -> code pairs")
flags.DEFINE_string("calib_layout", "records", "layout of --calib_data, one of kdjax.data.LAYOUTS "
                    "(dolly, dolly_es, bugnet, pytorrent, codeforces_cots, mbpp, humaneval, records)")
flags.DEFINE_integer("stdlib_pairs", _C.data.stdlib_pairs, "standard-library pairs to build when --calib_data "
                     "is not given")
flags.DEFINE_integer("calib_samples", 128, "calibration rows (GPTQ), from the train split")
flags.DEFINE_integer("calib_length", 256, "tokens per calibration row (the records' tokens joined and cut "
                     "into rows, as GPTQ's calibration text is)")
flags.DEFINE_enum("template", _C.data.template, ["minillm", "chat", "plain"], "prompt template of the rows")
flags.DEFINE_integer("split_seed", _C.data.seed, "seed of the train/test split (the trainer's)")
flags.DEFINE_integer("eval_samples", _C.data.test, "held-out records (the test split) for the report")
flags.DEFINE_integer("eval_length", 256, "tokens per held-out row for the perplexity (prompts that do not fit are "
                     "left out, responses cut)")
flags.DEFINE_bool("report", False, "also measure perplexity before/after (and Rouge-L with --rouge_samples)")
flags.DEFINE_integer("rouge_samples", 0, "with --report: greedy Rouge-L on this many held-out prompts (0 = skip)")
flags.DEFINE_integer("max_new_tokens", 64, "tokens generated per prompt for Rouge-L")
flags.DEFINE_integer("batch_size", 16, "rows per calibration / loss / generation batch")
flags.DEFINE_enum("float_dtype", "float16", ["float16", "bfloat16", "float32"], "dtype of the tensors that stay "
                  "float in the GPTQ checkpoint (embeddings, norms, head); GPTQ loaders expect float16")
FLAGS = flags.FLAGS

REPORT = "quantize_report"
MIB = 2 ** 20


def is_gptq_dir(path: str) -> bool:
    """True when `path` is a directory whose config.json says quant_method "gptq"."""
    try:
        with open(os.path.join(path, "config.json")) as f:
            qc = json.load(f).get("quantization_config") or {}
    except (OSError, ValueError):
        return False
    return qc.get("quant_method") == "gptq"


def check_flags():
    if FLAGS.bits not in (2, 4, 8):
        raise app.UsageError(f"--bits={FLAGS.bits}: GPTQ packing supports 2, 4 or 8")
    if FLAGS.group_size != -1 and FLAGS.group_size < 1:
        raise app.UsageError(f"--group_size={FLAGS.group_size}: expected a positive size or -1 (one group)")
    for name in ("calib_samples", "calib_length", "batch_size", "max_new_tokens", "eval_length"):
        if getattr(FLAGS, name) < 1:
            raise app.UsageError(f"--{name}={getattr(FLAGS, name)}: must be >= 1")
    if FLAGS.eval_samples < (1 if FLAGS.report else 0) or FLAGS.rouge_samples < 0:
        raise app.UsageError(f"--eval_samples={FLAGS.eval_samples}, --rouge_samples={FLAGS.rouge_samples}: "
                             f"--report needs --eval_samples >= 1, and --rouge_samples >= 0")
    if FLAGS.rouge_samples > FLAGS.eval_samples:
        raise app.UsageError(f"--rouge_samples={FLAGS.rouge_samples} exceeds --eval_samples={FLAGS.eval_samples} "
                             f"(Rouge-L is scored on held-out prompts)")


def check_group_size(model):
    """quantize_model's own check, before any data is read, as a usage error naming --group_size."""
    from kdjax.quant.quantize import _check_group_size, linear_paths
    try:
        _check_group_size(model, linear_paths(len(model.layers)), FLAGS.group_size)
    except ValueError as e:
        msg = str(e).replace("quantize_model: group_size=", "--group_size=")
        raise app.UsageError(msg.replace("use group_size=", "use --group_size=")) from None


def split_records():
    """(train records, held-out records) from --calib_data or the standard library."""
    from kdjax import data
    if FLAGS.calib_data:
        if FLAGS.calib_layout not in data.LAYOUTS:
            raise app.UsageError(f"--calib_layout={FLAGS.calib_layout}: expected one of {sorted(data.LAYOUTS)}")
        records = data.load_records(FLAGS.calib_data, FLAGS.calib_layout)
    else:
        records = data.python_function_records(limit=FLAGS.stdlib_pairs)
    if len(records) < FLAGS.eval_samples + 1:
        raise app.UsageError(f"{FLAGS.calib_data or 'stdlib pairs'}: {len(records)} records, too few for "
                             f"--eval_samples={FLAGS.eval_samples} held out plus calibration")
    splits = data.split_records(records, seed=FLAGS.split_seed, valid=0, test=FLAGS.eval_samples)
    return splits["train"], splits["test"]


def rows(records, tokenizer, length: int):
    """data.make_rows with long prompts skipped and long responses cut silently (expected here)."""
    from kdjax import data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return data.make_rows(records, tokenizer, max_length=length, template=FLAGS.template, on_long_prompt="skip")


def calibration(records, tokenizer):
    """input_ids [N, calib_length]: the records' token streams (prompt + response + EOS) joined and
    cut into windows, as GPTQ cuts its calibration text: no padding, every token counts."""
    import numpy as np
    from kdjax import data
    need = FLAGS.calib_samples * FLAGS.calib_length
    stream, used = [], 0
    for start in range(0, len(records), 64):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            examples = data.tokenize(records[start:start + 64], tokenizer, max_length=FLAGS.calib_length,
                                     template=FLAGS.template, on_long_prompt="skip")
        for ex in examples:
            stream.extend(ex.prompt_ids + ex.response_ids)
        used = start + 64
        if len(stream) >= need:
            break
    n = min(FLAGS.calib_samples, len(stream) // FLAGS.calib_length)
    if n == 0:
        raise app.UsageError(f"the calibration records give {len(stream)} tokens, fewer than one row of "
                             f"--calib_length={FLAGS.calib_length}")
    print(f"calibration: {n} rows x {FLAGS.calib_length} tokens from {min(used, len(records))} records", flush=True)
    return np.asarray(stream[:n * FLAGS.calib_length], np.int32).reshape(n, FLAGS.calib_length)


def quantize(model, tokenizer, train_records):
    """The QuantizedModel that the flags ask for."""
    from kdjax.quant import quantize_model
    kw = dict(method=FLAGS.method, bits=FLAGS.bits, group_size=FLAGS.group_size, sym=FLAGS.sym,
              desc_act=FLAGS.desc_act, percdamp=FLAGS.damp_percent, batch_size=FLAGS.batch_size)
    if FLAGS.method == "rtn":
        return quantize_model(model, **kw)
    return quantize_model(model, calibration(train_records, tokenizer), **kw)


def sizes(model, qm, out: str) -> dict:
    """Bytes of the float model and of the int4 one, on disk and in memory."""
    import numpy as np
    n = model.config.num_params()
    n_lin = sum(int(np.prod(q.shape)) for q in qm.linears.values())
    other = (n - n_lin) * (4 if FLAGS.float_dtype == "float32" else 2)
    disk = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out) if f.endswith(".safetensors"))
    return {"params": n, "linear_params": n_lin,
            "float32_memory_bytes": 4 * n, "bf16_memory_bytes": 2 * n, "bf16_disk_bytes": 2 * n,
            "linears_bf16_bytes": 2 * n_lin, "linears_packed_bytes": qm.nbytes(),
            "int4_memory_bytes": qm.nbytes() + other, "int4_disk_bytes": disk}


def prompts_that_fit(records, tokenizer, room: int):
    """The first --rouge_samples records whose prompt is at most `room` tokens."""
    from kdjax import data
    out = []
    for r in records:
        if len(out) >= FLAGS.rouge_samples:
            break
        if len(tokenizer.encode(data.render_prompt(r, FLAGS.template, tokenizer), add_special_tokens=False)) <= room:
            out.append(r)
    return out


def measure(model, tokenizer, held_out, prompts) -> dict:
    """Perplexity on the held-out response tokens and, when `prompts`, their greedy Rouge-L."""
    from kdjax import evaluate
    t0 = time.time()
    length = min(FLAGS.eval_length, model.config.max_position_embeddings)
    out = evaluate.validation_loss(model, rows(held_out, tokenizer, length), batch_size=FLAGS.batch_size)
    if prompts:
        r = evaluate.rouge_eval(model, tokenizer, prompts, seeds=[0], temperature=0.0,
                                max_new_tokens=FLAGS.max_new_tokens, template=FLAGS.template,
                                batch_size=FLAGS.batch_size, num_examples=2)
        out.update(rougeL=r["rougeL"], rougeL_unicode=r["rougeL_unicode"], rouge_prompts=len(prompts),
                   samples=r["samples"])
    out["seconds"] = time.time() - t0
    return out


def report_table(s: dict, qm, before: dict | None, after: dict | None) -> str:
    name = f"int4 {qm.method}, group {qm.group_size}{', act-order' if qm.desc_act else ''}{'' if qm.sym else ', asym'}"
    lines = [f"| | float | {name} |", "|---|---|---|",
             f"| size on disk | {s['bf16_disk_bytes'] / MIB:.1f} MiB (bf16 safetensors) | "
             f"{s['int4_disk_bytes'] / MIB:.1f} MiB |",
             f"| in memory | {s['bf16_memory_bytes'] / MIB:.1f} MiB bf16 "
             f"({s['float32_memory_bytes'] / MIB:.1f} fp32) | "
             f"{s['int4_memory_bytes'] / MIB:.1f} MiB packed |",
             f"| decoder linears | {s['linears_bf16_bytes'] / MIB:.1f} MiB bf16 | "
             f"{s['linears_packed_bytes'] / MIB:.1f} MiB packed |"]
    if before and after:
        lines.append(f"| perplexity (held-out, {before['num_tokens']} tokens) | {before['perplexity']:.3f} | "
                     f"{after['perplexity']:.3f} |")
        if "rougeL" in before:
            lines.append(f"| greedy Rouge-L ({before['rouge_prompts']} held-out prompts) | {before['rougeL']:.2f} | "
                         f"{after['rougeL']:.2f} |")
    lines.append(f"| time to quantize | – | {qm.seconds:.1f} s |")
    return "\n".join(lines) + "\n"


def run(model, tokenizer):
    """Quantize `model` as the flags say, write --out, print (and with --report write) the report."""
    from kdjax.quant import load_gptq, save_gptq
    if tokenizer is None and (FLAGS.method == "gptq" or FLAGS.report):
        raise app.UsageError(f"--model={FLAGS.model}: no tokenizer next to the weights (calibration and the "
                             f"report need one)")
    check_group_size(model)
    train, held_out = split_records() if (FLAGS.method == "gptq" or FLAGS.report) else ([], [])
    before = prompts = None
    if FLAGS.report:
        room = min(FLAGS.eval_length, model.config.max_position_embeddings - FLAGS.max_new_tokens)
        prompts = prompts_that_fit(held_out, tokenizer, room) if FLAGS.rouge_samples else []
        before = measure(model, tokenizer, held_out, prompts)
    act = ", act-order" if FLAGS.desc_act and FLAGS.method == "gptq" else ""
    print(f"quantizing the 7 linears of {len(model.layers)} layers: {FLAGS.method}, {FLAGS.bits} bits, "
          f"group {FLAGS.group_size}, {'sym' if FLAGS.sym else 'asym'}{act}", flush=True)
    qm = quantize(model, tokenizer, train)
    save_gptq(model, qm, FLAGS.out, tokenizer=tokenizer, dtype=FLAGS.float_dtype)
    print(f"wrote {FLAGS.out} (GPTQ checkpoint; {qm.method} took {qm.seconds:.1f} s)", flush=True)
    s = sizes(model, qm, FLAGS.out)
    after = None
    if FLAGS.report:
        int4, _ = load_gptq(FLAGS.out, dtype="float32")  # what the checkpoint holds, read back
        after = measure(int4, tokenizer, held_out, prompts)
    table = report_table(s, qm, before, after)
    print("\n" + table)
    for tag, result in (("float", before), ("int4", after)):
        for sample in (result or {}).get("samples", [])[:1]:
            print(f"{tag} example ({sample['source']}): {sample['generation'][:200]!r}")
    if FLAGS.report:
        result = {"source": FLAGS.model, "out": FLAGS.out, "method": qm.method, "bits": qm.bits,
                  "group_size": qm.group_size, "sym": qm.sym, "desc_act": qm.desc_act, "damp_percent": qm.percdamp,
                  "calib_tokens": qm.calib_tokens, "quantize_seconds": qm.seconds, "sizes": s,
                  "float": before, "int4": after}
        with open(os.path.join(FLAGS.out, REPORT + ".md"), "w", encoding="utf-8") as f:
            f.write(table)
        with open(os.path.join(FLAGS.out, REPORT + ".json"), "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2, ensure_ascii=False)
        print(f"wrote {os.path.join(FLAGS.out, REPORT)}.md and .json")
    return qm


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; every option is a --flag")
    check_flags()
    if is_gptq_dir(FLAGS.model):
        raise app.UsageError(f"--model={FLAGS.model} is already a GPTQ checkpoint; quantize its float source, or "
                             f"re-export it with `kdjax export --format=gptq`")
    import kdjax
    model, tokenizer = kdjax.load(FLAGS.model, dtype="float32")
    run(model, tokenizer)
