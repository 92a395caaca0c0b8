"""Generate text from a model, with the tokenizer's chat template applied to each prompt."""
import time

from absl import app, flags

flags.DEFINE_string("model", "smollm2-135m-instruct", "HF directory, .gguf file, kdjax checkpoint, or preset name")
flags.DEFINE_multi_string("prompt", None, "a user prompt (repeat the flag for a batch)", required=True)
flags.DEFINE_string("system", None, "optional system message")
flags.DEFINE_integer("max_new_tokens", 128, "tokens to generate at most", lower_bound=1)
flags.DEFINE_float("temperature", 0.0, "0 = greedy")
flags.DEFINE_integer("top_k", 0, "sample from the k most likely tokens (0 = all)")
flags.DEFINE_float("top_p", 1.0, "nucleus sampling mass")
flags.DEFINE_integer("seed", 0, "sampling seed")
flags.DEFINE_bool("raw", False, "do not apply the chat template")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "compute dtype")
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; every option is a --flag")
    if FLAGS.temperature < 0 or not 0 < FLAGS.top_p <= 1:
        raise app.UsageError("--temperature must be >= 0 and --top_p in (0, 1]")
    import kdjax
    from kdjax.generate import chat, generate, stop_tokens_of
    model, tokenizer = kdjax.load(FLAGS.model, dtype=FLAGS.dtype)
    if tokenizer is None:
        raise app.UsageError(f"--model={FLAGS.model}: no tokenizer found next to the weights")
    kw = dict(max_new_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature, top_k=FLAGS.top_k,
              top_p=FLAGS.top_p, seed=FLAGS.seed)
    start = time.time()
    if FLAGS.raw:
        ids = [tokenizer.encode(p) for p in FLAGS.prompt]
        outs = generate(model, ids, stop_tokens=stop_tokens_of(tokenizer, model.config), **kw)
        texts = [tokenizer.decode(o, skip_special_tokens=True) for o in outs]
    else:
        texts = chat(model, tokenizer, FLAGS.prompt, system=FLAGS.system, **kw)
    for prompt, text in zip(FLAGS.prompt, texts):
        print(f">>> {prompt}\n{text.strip()}\n")
    print(f"[{len(texts)} prompt(s), {time.time() - start:.1f}s including compilation]")
