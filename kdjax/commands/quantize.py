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
DIR/quantize_report.md and DIR/quantize_report.json. From Python: kdjax.quant.quantize_with_report.
"""
from absl import app, flags

from kdjax.commands import quantizing

FLAGS = flags.FLAGS
FLAG_MODULES = (quantizing,)  # the flags live there, shared with `kdjax export`


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; every option is a --flag")
    from kdjax.quant.export_gptq import is_gptq_dir
    opts = quantizing.options()
    if is_gptq_dir(FLAGS.model):
        raise app.UsageError(f"--model={FLAGS.model} is already a GPTQ checkpoint; quantize its float source, or "
                             f"re-export it with `kdjax export --format=gptq`")
    import kdjax
    model, tokenizer = kdjax.load(FLAGS.model, dtype="float32")
    quantizing.run(model, tokenizer, opts)
