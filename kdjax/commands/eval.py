"""Evaluate a model (and optionally its teacher): Rouge-L over sampling seeds as MiniLLM does,
validation loss and perplexity, teacher retention; prints the table, writes report.md/report.json."""
import os
import time

from absl import app, flags

from kdjax.train_config import get_config

_C = get_config()  # the data split defaults are the trainer's, so `kdjax eval` scores its test set

flags.DEFINE_string("model", "smollm2-135m-instruct", "the model to evaluate: HF directory, .gguf file, kdjax "
                    "checkpoint or preset name")
flags.DEFINE_string("teacher", None, "optional teacher (same forms as --model): evaluated too, for retention")
flags.DEFINE_string("data", None, "a local .jsonl/.json/.parquet file (or a hub dataset name); "
                    "without it, docstring -> code pairs from the standard library (--stdlib_pairs)")
flags.DEFINE_string("layout", "records", "layout of --data, one of kdjax.data.LAYOUTS "
                    "(dolly, dolly_es, bugnet, pytorrent, codeforces_cots, mbpp, humaneval, records)")
flags.DEFINE_integer("stdlib_pairs", _C.data.stdlib_pairs, "standard-library pairs to build when --data is not given", lower_bound=1)
flags.DEFINE_enum("split", "test", ["all", "train", "valid", "test"], "which split of the records to score "
                  "(split as the trainer splits: --split_seed, --valid, --test)")
flags.DEFINE_integer("split_seed", _C.data.seed, "seed of the train/valid/test split")
flags.DEFINE_integer("valid", _C.data.valid, "records in the valid split")
flags.DEFINE_integer("test", _C.data.test, "records in the test split")
flags.DEFINE_integer("num_samples", 0, "score the first N records of the split (0 = all)")
flags.DEFINE_list("seeds", ["10", "20", "30", "40", "50"], "sampling seeds (MiniLLM: 10,20,30,40,50); "
                  "one is used when --temperature=0")
flags.DEFINE_float("temperature", 1.0, "sampling temperature (MiniLLM: 1.0); 0 = greedy")
flags.DEFINE_float("top_p", 1.0, "nucleus sampling mass (MiniLLM: 1.0)")
flags.DEFINE_integer("top_k", 0, "sample from the k most likely tokens (0 = all)")
flags.DEFINE_integer("max_new_tokens", 128, "tokens to generate at most per prompt", lower_bound=1)
flags.DEFINE_integer("max_length", _C.data.max_length, "tokens per row for the validation loss "
                     "(prompts that do not fit are left out of the loss)", lower_bound=2)
flags.DEFINE_enum("template", _C.data.template, ["minillm", "chat", "plain"], "prompt template")
flags.DEFINE_integer("batch_size", 16, "prompts per generation batch and rows per loss batch", lower_bound=1)
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "compute dtype")
flags.DEFINE_string("metrics", None, "optional training metrics JSONL: also draw curves.png (loss and Rouge-L "
                    "against step)")
flags.DEFINE_string("out_dir", "runs/eval", "where report.md, report.json (and curves.png) go")
FLAGS = flags.FLAGS


def _records():
    from kdjax import data
    if FLAGS.data:
        if FLAGS.layout not in data.LAYOUTS:
            raise app.UsageError(f"--layout={FLAGS.layout}: expected one of {sorted(data.LAYOUTS)}")
        records = data.load_records(FLAGS.data, FLAGS.layout)
    else:
        if FLAGS.stdlib_pairs < 1:
            raise app.UsageError("--stdlib_pairs must be >= 1 when --data is not given")
        records = data.python_function_records(limit=FLAGS.stdlib_pairs)
    if FLAGS.split != "all":
        records = data.split_records(records, seed=FLAGS.split_seed, valid=FLAGS.valid, test=FLAGS.test)[FLAGS.split]
    if FLAGS.num_samples > 0:
        records = records[:FLAGS.num_samples]
    if not records:
        raise app.UsageError(f"no records to score in split {FLAGS.split!r} (--valid/--test/--num_samples)")
    return records


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; every option is a --flag")
    if FLAGS.temperature < 0 or not 0 < FLAGS.top_p <= 1:
        raise app.UsageError("--temperature must be >= 0 and --top_p in (0, 1]")
    try:
        seeds = [int(s) for s in FLAGS.seeds]
    except ValueError:
        raise app.UsageError(f"--seeds={','.join(FLAGS.seeds)}: expected integers, e.g. 10,20,30,40,50") from None
    import kdjax
    from kdjax import evaluate, report

    records = _records()
    print(f"scoring {len(records)} records ({FLAGS.data or f'{FLAGS.stdlib_pairs} stdlib pairs'}, "
          f"split {FLAGS.split}); seeds {seeds if FLAGS.temperature > 0 else seeds[:1]}, "
          f"temperature {FLAGS.temperature}, top_p {FLAGS.top_p}", flush=True)
    models = [("teacher", FLAGS.teacher)] if FLAGS.teacher else []
    models.append(("student" if FLAGS.teacher else "model", FLAGS.model))
    results, shared_tokenizer = {}, None
    for name, src in models:
        start = time.time()
        model, tokenizer = kdjax.load(src, dtype=FLAGS.dtype)
        tokenizer = tokenizer or shared_tokenizer  # a student saved without one uses the teacher's
        if tokenizer is None:
            raise app.UsageError(f"--{'teacher' if name == 'teacher' else 'model'}={src}: no tokenizer found next "
                                 f"to the weights")
        shared_tokenizer = shared_tokenizer or tokenizer
        print(f"[{name}] {src}", flush=True)
        result = evaluate.evaluate(
            model, tokenizer, records, max_length=FLAGS.max_length, template=FLAGS.template,
            batch_size=FLAGS.batch_size, seeds=seeds, temperature=FLAGS.temperature, top_p=FLAGS.top_p,
            top_k=FLAGS.top_k, max_new_tokens=FLAGS.max_new_tokens, log=lambda m: print(f"  {m}", flush=True))
        result["source"] = src
        results[name] = result
        skipped = result["loss_rows_skipped"]
        print(f"  loss {result['loss']:.4f} over {result['num_tokens']} response tokens"
              + (f" ({skipped} records left out: prompt longer than --max_length={FLAGS.max_length})" if skipped else "")
              + f"; {time.time() - start:.1f}s", flush=True)
        for s in result["samples"][:1]:
            print(f"  example ({s['source']}): {s['generation'][:200]!r}", flush=True)
        del model
    table = report.table(results, teacher="teacher", out_dir=FLAGS.out_dir)
    print("\n" + table)
    print(f"wrote {os.path.join(FLAGS.out_dir, 'report.md')} and report.json")
    if FLAGS.metrics:
        png = report.plot_curves(FLAGS.metrics, os.path.join(FLAGS.out_dir, "curves.png"))
        print(f"wrote {png}")
