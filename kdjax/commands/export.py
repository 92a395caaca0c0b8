"""Export a model for serving: --format=hf (bf16 safetensors) or --format=gptq (int4 GPTQ checkpoint).

--format=hf: model.safetensors in bfloat16 + config.json (+ the tokenizer), which
transformers.AutoModelForCausalLM.from_pretrained loads. From a GPTQ directory, the dequantized
int4 weights are written (rounded to bf16).
--format=gptq: from a GPTQ directory, its int4 codes, scales and zeros are re-packed unchanged (no
second quantization; the float tensors are written in --float_dtype). From a float model, this is
`kdjax quantize` itself: the same flags (--method, --bits, --group_size, --sym, --desc_act,
--calib_*, --report), listed below. The quantization flags are ignored for --format=hf.
"""
from absl import app, flags

from kdjax.commands import quantizing

flags.DEFINE_enum("format", None, ["hf", "gptq"], "hf = bf16 safetensors; gptq = int4 GPTQ v1 checkpoint",
                  required=True)
FLAGS = flags.FLAGS
FLAG_MODULES = (quantizing,)  # --model, --out, and the quantization flags


def read_gptq_model(path: str):
    """A GPTQ directory -> (float model holding the dequantized weights, QuantizedModel, tokenizer)."""
    from kdjax.checkpoint import model_from_hf_tensors, tokenizer_from_dir
    from kdjax.quant import read_gptq
    cfg, qm, tensors = read_gptq(path)
    return model_from_hf_tensors(cfg, tensors, source=path), qm, tokenizer_from_dir(path)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; every option is a --flag")
    import kdjax
    from kdjax.quant import save_gptq
    from kdjax.quant.export_gptq import is_gptq_dir
    quantized = is_gptq_dir(FLAGS.model)
    opts = quantizing.options() if FLAGS.format == "gptq" and not quantized else None
    if quantized:
        model, qm, tokenizer = read_gptq_model(FLAGS.model)
    else:
        model, tokenizer = kdjax.load(FLAGS.model, dtype="float32")
    cfg = model.config
    if FLAGS.format == "hf":
        kdjax.save(model, FLAGS.out, format="hf", tokenizer=tokenizer, dtype="bfloat16")
        what = "dequantized int4 weights, " if quantized else ""
        print(f"wrote {FLAGS.out} (hf, {what}bfloat16, {cfg.architecture}, {cfg.num_params() / 1e6:.1f}M parameters)")
    elif quantized:
        save_gptq(model, qm, FLAGS.out, tokenizer=tokenizer, dtype=FLAGS.float_dtype)
        print(f"wrote {FLAGS.out} (gptq, re-packed from {FLAGS.model}: {qm.bits} bits, group {qm.group_size}, "
              f"{len(qm.linears)} linears)")
    else:
        quantizing.run(model, tokenizer, opts)
