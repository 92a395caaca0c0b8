"""The flags of `kdjax quantize`, shared with `kdjax export --format=gptq`, and the run both make.

Every flag is a field of kdjax.quant.report.QuantizeOptions (its default is the field's), plus
--model, --out and the records: --calib_data with --calib_layout, or --stdlib_pairs pairs. The work
is `kdjax.quant.report.quantize_with_report`; this module only turns flags into its arguments.
"""
from __future__ import annotations

import dataclasses

from absl import app, flags

from kdjax.quant.report import QuantizeOptions
from kdjax.train_config import get_config

_D = QuantizeOptions()  # the defaults
_STDLIB_PAIRS = get_config().data.stdlib_pairs

flags.DEFINE_string("model", "smollm2-135m-instruct", "float model: HF directory, .gguf file, kdjax checkpoint or "
                    "preset name (for `kdjax export`: also a GPTQ directory)")
flags.DEFINE_string("out", None, "output directory", required=True)
flags.DEFINE_enum("method", _D.method, ["rtn", "gptq"], "rtn = round to nearest; gptq = Hessian-aware rounding on "
                  "calibration data (sequential over the layers)")
flags.DEFINE_integer("bits", _D.bits, "bits per weight (2, 4 or 8; GPU kernels serve 4)")
flags.DEFINE_integer("group_size", _D.group_size, "input rows per scale/zero group (-1 = one group per output "
                     "column); must divide every linear's input size (SmolLM2-135M: 576 and 1536, so 64)")
flags.DEFINE_bool("sym", _D.sym, "symmetric grid (zero point fixed at 2**(bits-1)); --nosym fits a zero per group")
flags.DEFINE_bool("desc_act", _D.desc_act, "GPTQ act-order: quantize input rows by decreasing Hessian diagonal (on "
                  "by default: without it GPTQ turned SmolLM2's greedy code answers into prose, docs/quantization.md)")
flags.DEFINE_float("damp_percent", _D.damp_percent, "GPTQ dampening: this fraction of the mean Hessian diagonal is "
                   "added")
flags.DEFINE_float("mse", _D.mse, "search each group's range p * [min, max] (p = 1 .. 0.21) for the least sum of "
                   "|error|**mse, as gptqmodel's mse option; 0 keeps the full range; -1: 2.4 for gptq, 0 for rtn "
                   "(SmolLM2 GPTQ g64: perplexity +9.5% at 0, +5.7% at 2.4; the search made RTN worse, "
                   "docs/quantization.md)")
flags.DEFINE_string("calib_data", None, "calibration / held-out records: a local .jsonl/.json/.parquet file (or a "
                    "hub dataset name) read with --calib_layout; default: --stdlib_pairs docstring -> code pairs")
flags.DEFINE_string("calib_layout", "records", "layout of --calib_data, one of kdjax.data.LAYOUTS "
                    "(dolly, dolly_es, bugnet, pytorrent, codeforces_cots, mbpp, humaneval, records)")
flags.DEFINE_integer("stdlib_pairs", _STDLIB_PAIRS, "standard-library pairs to build when --calib_data is not given")
flags.DEFINE_integer("calib_samples", _D.calib_samples, "calibration rows (GPTQ), from the train split")
flags.DEFINE_integer("calib_length", _D.calib_length, "tokens per calibration row (the records' tokens joined and "
                     "cut into rows, as GPTQ's calibration text is)")
flags.DEFINE_enum("template", _D.template, ["minillm", "chat", "plain"], "prompt template of the rows")
flags.DEFINE_integer("split_seed", _D.split_seed, "seed of the train/test split (the trainer's)")
flags.DEFINE_integer("eval_samples", _D.eval_samples, "held-out records (the test split) for the report")
flags.DEFINE_integer("eval_length", _D.eval_length, "tokens per held-out row for the perplexity (prompts that do "
                     "not fit are left out, responses cut)")
flags.DEFINE_bool("report", _D.report, "also measure perplexity before/after (and Rouge-L with --rouge_samples)")
flags.DEFINE_integer("rouge_samples", _D.rouge_samples, "with --report: greedy Rouge-L on this many held-out "
                     "prompts (0 = skip)")
flags.DEFINE_integer("max_new_tokens", _D.max_new_tokens, "tokens generated per prompt for Rouge-L")
flags.DEFINE_integer("batch_size", _D.batch_size, "rows per calibration / loss / generation batch")
flags.DEFINE_enum("float_dtype", _D.float_dtype, ["float16", "bfloat16", "float32"], "dtype of the tensors that "
                  "stay float in the GPTQ checkpoint (embeddings, norms, head); GPTQ loaders expect float16")
FLAGS = flags.FLAGS


def options() -> QuantizeOptions:
    """QuantizeOptions from the flags; a bad value is a usage error naming its flag."""
    opts = QuantizeOptions(**{f.name: FLAGS[f.name].value for f in dataclasses.fields(QuantizeOptions)})
    try:
        opts.check(prefix="--")
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    return opts


def records(opts: QuantizeOptions) -> list:
    """The records of --calib_data (read with --calib_layout), or --stdlib_pairs standard-library pairs."""
    from kdjax import data
    if not opts.needs_data:
        return []
    if FLAGS.calib_data:
        if FLAGS.calib_layout not in data.LAYOUTS:
            raise app.UsageError(f"--calib_layout={FLAGS.calib_layout}: expected one of {sorted(data.LAYOUTS)}")
        return data.load_records(FLAGS.calib_data, FLAGS.calib_layout)
    return data.python_function_records(limit=FLAGS.stdlib_pairs)


def run(model, tokenizer, opts: QuantizeOptions):
    """Quantize `model` into --out as the flags say; print (and with --report write) the report."""
    from kdjax.quant.report import check_inputs, quantize_with_report
    if tokenizer is None and opts.needs_data:
        raise app.UsageError(f"--model={FLAGS.model}: no tokenizer next to the weights (calibration and the "
                             f"report need one)")
    recs = records(opts)
    try:
        check_inputs(model, tokenizer, recs, opts, prefix="--")
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    return quantize_with_report(model, tokenizer, FLAGS.out, recs, opts, source=FLAGS.model,
                                log=lambda line: print(line, flush=True))["qm"]
