"""kdjax.evaluate: validation loss vs float64 numpy, Rouge-L protocol, report, plots, `kdjax eval`."""
import dataclasses
import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from rouge_score import rouge_scorer

import kdjax
from kdjax import data, evaluate, report
from kdjax.data import DataError, Record
from kdjax.generate import generate
from kdjax.rouge import UnicodeCodeTokenizer

RECS = [
    Record("Add two numbers.", "def add(a, b):\n    return a + b", source="t.jsonl:1"),
    Record("¿Qué es Python?", "Un lenguaje de programación.", source="t.jsonl:2"),
    Record("Summarise.", "Short text.", context="A long paragraph about cats and dogs.", source="t.jsonl:3"),
    Record("Name a colour.", "Blue.", source="t.jsonl:4"),
    Record("Say hi", "hi", source="t.jsonl:5"),
]


@pytest.fixture(scope="module")
def tokenizer():
    """A real HF fast tokenizer with one token per UTF-8 byte (259 ids: fits the tiny model's 512)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|pad|>",
                                   bos_token="<|im_start|>")


@pytest.fixture(scope="module")
def model():
    return kdjax.Qwen2(kdjax.ModelConfig.preset("tiny-qwen2"), seed=3)


def log_softmax64(logits):
    x = np.asarray(logits, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


# --------------------------------------------------------------------------- validation loss

# Shapes are shared between tests (batch 4, 96-token rows, 6 new tokens) so compilations are reused.
T, B, NEW = 96, 4, 6


@pytest.fixture(scope="module")
def reference_loss(model, tokenizer):
    """Float64 log-softmax of the full logits, mean -log q over the response targets.

    The sequences are right-padded into one batch with no attention mask: under causal attention
    a token never sees what comes after it, so the padding cannot change the logits used."""
    examples = data.tokenize(RECS, tokenizer, max_length=T, template="plain")
    ids = np.zeros((len(examples), max(map(len, examples))), np.int32)
    for i, ex in enumerate(examples):
        ids[i, :len(ex)] = ex.prompt_ids + ex.response_ids
    graphdef, state = nnx.split(model)
    logp = log_softmax64(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, ids))
    nll, count = 0.0, 0
    for i, ex in enumerate(examples):
        for t in range(len(ex.prompt_ids) - 1, len(ex) - 1):  # logits at t predict token t + 1
            nll -= logp[i, t, ids[i, t + 1]]
            count += 1
    return nll / count, count


@pytest.mark.parametrize("packing,padding", [(False, "right"), (False, "left"), (True, "right")])
def test_validation_loss_equals_float64_reference(model, tokenizer, reference_loss, packing, padding):
    expected, count = reference_loss
    rows = data.make_rows(RECS, tokenizer, max_length=T, template="plain", packing=packing, padding=padding)
    assert packing == (rows["segment_ids"].max() > 1)
    got = evaluate.validation_loss(model, rows, batch_size=B)  # 5 sequences: a filled-up last batch
    assert got["num_tokens"] == count
    assert got["loss"] == pytest.approx(expected, rel=2e-6)
    assert got["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)


def test_validation_loss_errors(model, tokenizer):
    rows = data.make_rows(RECS[:B], tokenizer, max_length=T, template="plain")
    with pytest.raises(ValueError, match="every loss_mask is 0"):
        evaluate.validation_loss(model, dict(rows, loss_mask=np.zeros_like(rows["loss_mask"])))
    with pytest.raises(ValueError, match=r"lack \['positions'\]"):
        evaluate.validation_loss(model, {k: v for k, v in rows.items() if k != "positions"})


# --------------------------------------------------------------------------- generations

def test_generate_responses_keep_the_order_of_the_records(model, tokenizer):
    # Sorted by length into batches of 4 (the 5th alone, filled up); the reference decodes the
    # first four in reverse order, in one batch.
    got = evaluate.generate_responses(model, tokenizer, RECS, template="plain", temperature=0.0, max_new_tokens=NEW,
                                      batch_size=B)
    prompts = [tokenizer.encode(data.render_prompt(r, "plain"), add_special_tokens=False) for r in RECS[:B]]
    ref = generate(model, prompts[::-1], max_new_tokens=NEW, stop_tokens=[tokenizer.eos_token_id],
                   pad_id=tokenizer.pad_token_id)[::-1]
    assert got[:B] == [tokenizer.decode(r, skip_special_tokens=True).strip() for r in ref]
    assert len(got) == len(RECS) and all(isinstance(g, str) for g in got)
    # Sampling: the same seed gives the same responses, another seed others.
    kw = dict(template="plain", temperature=1.0, max_new_tokens=NEW, batch_size=B)
    a = evaluate.generate_responses(model, tokenizer, RECS[:B], seed=10, **kw)
    assert a == evaluate.generate_responses(model, tokenizer, RECS[:B], seed=10, **kw)
    assert a != evaluate.generate_responses(model, tokenizer, RECS[:B], seed=20, **kw)


def test_prompt_longer_than_context_names_the_record(model, tokenizer):
    long = Record("x" * 157, "y", source="big.jsonl:7")  # 256-token context, 100 new tokens
    with pytest.raises(DataError, match=r"big\.jsonl:7: the prompt is 157 tokens, longer than the 156 .*max_new_tokens"):
        evaluate.generate_responses(model, tokenizer, [RECS[0], long], template="plain", max_new_tokens=100)


# --------------------------------------------------------------------------- Rouge-L protocol

def test_rouge_eval_mean_and_std_over_seeds(monkeypatch, model, tokenizer):
    refs = [r.response for r in RECS]
    outputs = {10: refs,  # perfect
               20: ["def add(a, b):\n    return a - b", "Un lenguaje de programacion.", "short", "Red.", "hi there"],
               30: ["no"] * len(RECS)}
    calls = []

    def fake(model_, tokenizer_, records, **kw):
        calls.append(kw)
        return list(outputs[kw["seed"]])

    monkeypatch.setattr(evaluate, "generate_responses", fake)
    got = evaluate.rouge_eval(model, tokenizer, RECS, seeds=(10, 20, 30), temperature=1.0, top_p=0.9,
                              max_new_tokens=7)
    assert [c["seed"] for c in calls] == [10, 20, 30] and calls[0]["top_p"] == 0.9
    stock = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)  # MiniLLM's scorer, independently
    unicode = rouge_scorer.RougeScorer(["rougeL"], tokenizer=UnicodeCodeTokenizer())
    for key, scorer in (("rougeL", stock), ("rougeL_unicode", unicode)):
        per_seed = [np.mean([100 * scorer.score(target=r, prediction=p)["rougeL"].fmeasure
                             for p, r in zip(outputs[s], refs)]) for s in (10, 20, 30)]
        assert [r[key] for r in got["per_seed"]] == pytest.approx(per_seed)
        assert got[key] == pytest.approx(np.mean(per_seed)) and got[f"{key}_std"] == pytest.approx(np.std(per_seed))
        assert per_seed[0] == 100.0 and got[f"{key}_std"] > 0
    # "a - b" for "a + b": the stock tokenizer cannot see it, the unicode/code variant does.
    code = [outputs[20][0]], [refs[0]]
    assert evaluate.corpus_rouge_l(*code) == 100.0 > evaluate.corpus_rouge_l(*code, variant="unicode")
    assert got["samples"][0]["generation"] == refs[0] and len(got["samples"]) == 3
    assert got["seeds"] == [10, 20, 30] and got["num_samples"] == len(RECS)
    # Greedy: one seed is enough.
    calls.clear()
    greedy = evaluate.rouge_eval(model, tokenizer, RECS, seeds=(20, 30), temperature=0.0)
    assert [c["seed"] for c in calls] == [20] and greedy["rougeL"] == got["per_seed"][1]["rougeL"]
    assert greedy["rougeL_std"] == 0.0


def test_evaluate_combines_rouge_and_loss(model, tokenizer):
    got = evaluate.evaluate(model, tokenizer, RECS[:B], max_length=T, template="plain", seeds=(1,),
                            temperature=0.0, max_new_tokens=NEW, batch_size=B)
    rows = data.make_rows(RECS[:B], tokenizer, max_length=T, template="plain")
    assert got["loss"] == pytest.approx(evaluate.validation_loss(model, rows)["loss"], rel=1e-6)
    assert 0 <= got["rougeL"] <= 100 and got["loss_rows_skipped"] == 0


# --------------------------------------------------------------------------- report

def test_retention_and_report(tmp_path):
    assert report.retention(30.0, 40.0) == 0.75
    with pytest.raises(ValueError, match="must be > 0"):
        report.retention(1.0, 0.0)
    results = {"teacher": {"rougeL": 40.0, "rougeL_std": 0.5, "rougeL_unicode": 32.0, "loss": 1.5, "perplexity": 4.48},
               "student": {"rougeL": 30.0, "rougeL_std": 1.25, "rougeL_unicode": 28.0, "loss": 2.0,
                           "perplexity": math.exp(2.0)},
               "student before KD": {"rougeL": 10.0, "rougeL_unicode": 8.0}}
    table = report.table(results, teacher="teacher", out_dir=str(tmp_path))
    lines = table.strip().splitlines()
    assert lines[0].startswith("| model | Rouge-L | Rouge-L unicode | val loss | ppl | retention %")
    assert lines[2] == "| teacher | 40.00 ± 0.50 | 32.00 | 1.5000 | 4.48 | 100.0 | 100.0 |"
    assert lines[3] == "| student | 30.00 ± 1.25 | 28.00 | 2.0000 | 7.39 | 75.0 | 87.5 |"
    assert lines[4] == "| student before KD | 10.00 | 8.00 | – | – | 25.0 | 25.0 |"
    assert (tmp_path / "report.md").read_text() == table
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["teacher"] == "teacher" and saved["results"]["student"]["retention"] == 0.75
    assert saved["results"]["student"]["retention_unicode"] == 28.0 / 32.0
    # No teacher row: no retention.
    assert report.table({"model": results["student"]}, teacher="teacher").splitlines()[2].endswith("| – | – |")


# --------------------------------------------------------------------------- plots

def test_plot_curves_writes_a_png(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": 3 * math.exp(-s / 40), "kd_loss": 2 * math.exp(-s / 40), "ce_loss": 4 - s / 50,
             "tokens_per_s": 1000.0} for s in range(0, 120, 10)]
    rows += [{"step": s, "rougeL": 10 + s / 10, "rougeL_std": 1.0, "rougeL_unicode": 8 + s / 12, "loss": 3.1 - s / 100}
             for s in (0, 40, 80, 120)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = report.plot_curves(str(path), str(tmp_path / "plots" / "curves.png"), title="test run")
    import matplotlib.image
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    img = matplotlib.image.imread(out)
    assert img.shape[0] > 300 and img.shape[1] > 800 and img[..., :3].std() > 0.05  # not a blank image
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 1, "loss": 2}\n{"loss": 3}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl, line 2, field 'step'"):
        report.plot_curves(str(bad), str(tmp_path / "x.png"))


# --------------------------------------------------------------------------- the command

def _kdjax(*args, timeout=240):
    return subprocess.run([sys.executable, "-m", "kdjax", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_eval_help():
    out = _kdjax("eval", "--help", timeout=120)
    assert out.returncode == 0, out.stderr
    for flag in ("--model", "--teacher", "--data", "--layout", "--stdlib_pairs", "--num_samples", "--seeds",
                 "--temperature", "--top_p", "--max_new_tokens", "--template", "--out_dir"):
        assert flag in out.stdout


def test_eval_command_runs_on_a_saved_model(tmp_path, model, tokenizer):
    ckpt = kdjax.save(model, str(tmp_path / "tiny"), format="kdjax", tokenizer=tokenizer)
    # References built from the model's own greedy answers, so that the scores are not 0 (a random
    # model writes garbage) and can be checked against this process.
    recs = RECS[:B]
    gens = evaluate.generate_responses(model, tokenizer, recs, template="plain", temperature=0.0, max_new_tokens=NEW,
                                       batch_size=B)
    recs = [dataclasses.replace(r, response=f"{g} tail") for r, g in zip(recs, gens)]
    data.save_records(recs, str(tmp_path / "recs.jsonl"))
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 0, "loss": 5.0}\n{"step": 10, "loss": 4.0}\n{"step": 10, "rougeL": 3.0}\n')
    out_dir = tmp_path / "eval"
    out = _kdjax("eval", f"--model={ckpt}", f"--teacher={ckpt}", f"--data={tmp_path / 'recs.jsonl'}",
                 "--layout=records", "--split=all", "--num_samples=0", "--seeds=1,2", "--temperature=0",
                 f"--max_new_tokens={NEW}", f"--max_length={T}", "--template=plain", f"--batch_size={B}",
                 f"--metrics={metrics}", f"--out_dir={out_dir}")
    assert out.returncode == 0, out.stdout + out.stderr
    saved = json.loads((out_dir / "report.json").read_text())["results"]
    assert set(saved) == {"teacher", "student"}
    student = saved["student"]
    assert student["seeds"] == [1] and student["num_samples"] == B  # greedy: one seed
    refs = [r.response for r in recs]
    for key, variant in evaluate.ROUGE_KEYS.items():
        assert student[key] == pytest.approx(evaluate.corpus_rouge_l(gens, refs, variant=variant))
    assert 0 < student["rougeL_unicode"] < 100
    # The same weights as teacher and student: retention exactly 1.
    assert student["retention_unicode"] == 1.0 and saved["teacher"]["retention_unicode"] == 1.0
    rows = data.make_rows(recs, tokenizer, max_length=T, template="plain")
    assert student["loss"] == pytest.approx(evaluate.validation_loss(model, rows, batch_size=B)["loss"], rel=1e-5)
    assert "| student |" in out.stdout and (out_dir / "report.md").exists() and (out_dir / "curves.png").exists()
