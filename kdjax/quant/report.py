"""Quantize a model into a GPTQ directory and report what it cost: `kdjax quantize` as a library call.

    from kdjax.quant.report import QuantizeOptions, quantize_with_report
    result = quantize_with_report(model, tokenizer, "out/", records, QuantizeOptions(group_size=64, report=True))

Data: `records` are split as the trainer splits them (`kdjax.data.split_records` with
`split_seed`, `eval_samples` held out), so the held-out rows are the test set of `kdjax eval` and
`kdjax distill`; GPTQ's calibration windows come from the train split (kdjax/quant/calibration.py).
Always measured: the size on disk and the packed size in memory against float. With `report`:
perplexity on the held-out response tokens before and after (the written checkpoint read back)
and, with `rouge_samples`, greedy Rouge-L on that many held-out prompts; written to
`out/quantize_report.md` and `.json`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
import warnings
from typing import Any, Callable, Sequence

import numpy as np

from kdjax import data
from kdjax.quant.calibration import calibration_ids
from kdjax.quant.export_gptq import load_gptq, save_gptq
from kdjax.quant.quantize import (AUTO_MSE, METHODS, QuantizedModel, check_group_size, grid_problem, quantize_model,
                                  range_search)
from kdjax.train_config import get_config

REPORT = "quantize_report"  # out/quantize_report.md and .json
MIB = 2 ** 20
_DATA = get_config().data  # the trainer's template and split, so the held-out rows are its test set


@dataclasses.dataclass(frozen=True)
class QuantizeOptions:
    """What `quantize_with_report` does; the defaults are `kdjax quantize`'s (its flags read them here)."""

    method: str = "gptq"  # "rtn" (round to nearest) or "gptq" (Hessian-aware, sequential over the layers)
    bits: int = 4  # 2, 4 or 8 (GPU kernels serve 4)
    group_size: int = 128  # input rows per scale/zero group; -1 = one group per output column
    sym: bool = True  # symmetric grid (zero point fixed at 2**(bits-1)); False fits a zero per group
    desc_act: bool = True  # GPTQ act-order (without it GPTQ turned SmolLM2's code answers into prose)
    damp_percent: float = 0.01  # GPTQ dampening: this fraction of the mean Hessian diagonal is added
    mse: float = AUTO_MSE  # each group's range searched for the least sum |error|**mse (gptqmodel's `mse`; 0: off;
    # AUTO_MSE (-1): 2.4 for GPTQ, 0 for RTN, quantize.range_search)
    calib_samples: int = 128  # calibration rows (GPTQ), from the train split
    calib_length: int = 256  # tokens per calibration row
    template: str = _DATA.template  # prompt template of the rows
    split_seed: int = _DATA.seed  # seed of the train/test split (the trainer's)
    eval_samples: int = _DATA.test  # held-out records (the test split) for the report
    eval_length: int = 256  # tokens per held-out row for the perplexity
    report: bool = False  # measure perplexity (and Rouge-L) before and after, write the report files
    rouge_samples: int = 0  # with report: greedy Rouge-L on this many held-out prompts (0 = skip)
    max_new_tokens: int = 64  # tokens generated per prompt for Rouge-L
    batch_size: int = 16  # rows per calibration / loss / generation batch
    float_dtype: str = "float16"  # tensors that stay float in the checkpoint (embeddings, norms, head)

    def check(self, prefix: str = "") -> None:
        """Raises ValueError naming the first bad field as `{prefix}{field}` (a command passes "--")."""
        def bad(field, why):
            raise ValueError(f"{prefix}{field}={getattr(self, field)}: {why}")
        if self.method not in METHODS:
            bad("method", f"expected one of {METHODS}")
        problem = grid_problem(self.bits, self.group_size, self.mse, self.float_dtype)
        if problem:
            bad(*problem)
        for field in ("calib_samples", "calib_length", "batch_size", "max_new_tokens", "eval_length"):
            if getattr(self, field) < 1:
                bad(field, "must be >= 1")
        if self.eval_samples < (1 if self.report else 0):
            bad("eval_samples", "must be >= 0, and >= 1 for the report")
        if not 0 <= self.rouge_samples <= self.eval_samples:
            bad("rouge_samples", f"expected 0 .. {prefix}eval_samples={self.eval_samples} (Rouge-L is scored on "
                                 f"held-out prompts)")

    @property
    def needs_data(self) -> bool:
        """GPTQ calibrates and the report measures on records; RTN alone needs none."""
        return self.method == "gptq" or self.report


def train_and_held_out(records: Sequence[data.Record], options: QuantizeOptions) -> tuple[list, list]:
    """(train records, held-out records): the split the trainer makes with the same seed and size."""
    splits = data.split_records(records, seed=options.split_seed, valid=0, test=options.eval_samples)
    return splits["train"], splits["test"]


def model_sizes(model, qm: QuantizedModel, out: str | None = None, float_dtype: str = "float16") -> dict[str, int]:
    """Bytes of the float model and of the quantized one, in memory and (with `out`, the GPTQ
    directory written) on disk. The tensors that stay float count at `float_dtype`."""
    n = model.config.num_params()
    n_lin = sum(int(np.prod(q.shape)) for q in qm.linears.values())
    other = (n - n_lin) * np.dtype(np.float32 if float_dtype == "float32" else np.float16).itemsize
    sizes = {"params": n, "linear_params": n_lin,
             "float32_memory_bytes": 4 * n, "bf16_memory_bytes": 2 * n, "bf16_disk_bytes": 2 * n,
             "linears_bf16_bytes": 2 * n_lin, "linears_packed_bytes": qm.nbytes(),
             "int4_memory_bytes": qm.nbytes() + other}
    if out is not None:
        sizes["int4_disk_bytes"] = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out)
                                       if f.endswith(".safetensors"))
    return sizes


def served_bytes(model) -> int:
    """Bytes of `model` as served: int4 layers (`Int4Linear`) packed as a GPTQ checkpoint holds them
    (qweight, qzeros, float16 scales, int32 g_idx), every float parameter at 16 bits. For a float
    model that is its bf16 size; for an int4 one, `model_sizes`' int4_memory_bytes."""
    import jax
    from flax import nnx
    from kdjax.quant.aqt_pass import Int4Linear
    total = 0
    for _, node in nnx.iter_graph(model):
        if isinstance(node, Int4Linear):
            (n_in, n_out), g = node.shape, node.scale.shape[0]
            total += (n_in * n_out + g * n_out) * node.bits // 8 + g * n_out * 2 + n_in * 4
    return total + 2 * sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def prompts_that_fit(records: Sequence[data.Record], tokenizer: Any, *, room: int, limit: int,
                     template: str) -> list[data.Record]:
    """The first `limit` records whose rendered prompt is at most `room` tokens."""
    out = []
    for r in records:
        if len(out) >= limit:
            break
        if len(tokenizer.encode(data.render_prompt(r, template, tokenizer), add_special_tokens=False)) <= room:
            out.append(r)
    return out


def measure(model, tokenizer: Any, held_out: Sequence[data.Record], prompts: Sequence[data.Record] = (), *,
            options: QuantizeOptions = QuantizeOptions()) -> dict[str, Any]:
    """Perplexity on the response tokens of `held_out` (rows of `options.eval_length` tokens; prompts
    that do not fit are left out, responses cut) and, when `prompts`, their greedy Rouge-L.
    Returns {"loss", "perplexity", "num_tokens", ["rougeL", "rougeL_unicode", "rouge_prompts",
    "samples"], "seconds"}."""
    from kdjax import evaluate
    t0 = time.time()
    length = min(options.eval_length, model.config.max_position_embeddings)
    with warnings.catch_warnings():  # long prompts skipped, long responses cut: expected here
        warnings.simplefilter("ignore")
        rows = data.make_rows(held_out, tokenizer, max_length=length, template=options.template,
                              on_long_prompt="skip")
    out = evaluate.validation_loss(model, rows, batch_size=options.batch_size)
    if prompts:
        r = evaluate.rouge_eval(model, tokenizer, prompts, seeds=[0], temperature=0.0,
                                max_new_tokens=options.max_new_tokens, template=options.template,
                                batch_size=options.batch_size, num_examples=2)
        out.update(rougeL=r["rougeL"], rougeL_unicode=r["rougeL_unicode"], rouge_prompts=len(prompts),
                   samples=r["samples"])
    out["seconds"] = time.time() - t0
    return out


def report_table(sizes: dict, qm: QuantizedModel, before: dict | None = None, after: dict | None = None) -> str:
    """The Markdown table of the report: sizes, and with `before`/`after` (`measure`) the quality."""
    name = f"int4 {qm.method}, group {qm.group_size}{', act-order' if qm.desc_act else ''}{'' if qm.sym else ', asym'}"
    lines = [f"| | float | {name} |", "|---|---|---|"]
    if "int4_disk_bytes" in sizes:
        lines.append(f"| size on disk | {sizes['bf16_disk_bytes'] / MIB:.1f} MiB (bf16 safetensors) | "
                     f"{sizes['int4_disk_bytes'] / MIB:.1f} MiB |")
    lines += [f"| in memory | {sizes['bf16_memory_bytes'] / MIB:.1f} MiB bf16 "
              f"({sizes['float32_memory_bytes'] / MIB:.1f} fp32) | "
              f"{sizes['int4_memory_bytes'] / MIB:.1f} MiB packed |",
              f"| decoder linears | {sizes['linears_bf16_bytes'] / MIB:.1f} MiB bf16 | "
              f"{sizes['linears_packed_bytes'] / MIB:.1f} MiB packed |"]
    if before and after:
        lines.append(f"| perplexity (held-out, {before['num_tokens']} tokens) | {before['perplexity']:.3f} | "
                     f"{after['perplexity']:.3f} |")
        if "rougeL" in before:
            lines.append(f"| greedy Rouge-L ({before['rouge_prompts']} held-out prompts) | {before['rougeL']:.2f} | "
                         f"{after['rougeL']:.2f} |")
    lines.append(f"| time to quantize | – | {qm.seconds:.1f} s |")
    return "\n".join(lines) + "\n"


def check_inputs(model, tokenizer: Any, records: Sequence[data.Record], options: QuantizeOptions,
                 prefix: str = "") -> None:
    """Everything `quantize_with_report` can refuse, before any compute: ValueError naming
    `{prefix}{field}` for a bad option."""
    options.check(prefix)
    check_group_size(model, options.group_size, option=f"{prefix}group_size")
    if options.needs_data:
        if tokenizer is None:
            raise ValueError("no tokenizer came with the model (GPTQ calibration and the report need one)")
        if len(records) < options.eval_samples + 1:
            raise ValueError(f"{len(records)} records are too few for {prefix}eval_samples={options.eval_samples} "
                             f"held out plus calibration")


def quantize_with_report(model, tokenizer: Any, out: str, records: Sequence[data.Record] = (),
                         options: QuantizeOptions = QuantizeOptions(), *, source: str = "",
                         log: Callable[[str], None] = print) -> dict[str, Any]:
    """Quantizes every decoder linear of `model` as `options` say, writes the GPTQ directory `out`
    (with the tokenizer), measures, and with `options.report` writes out/quantize_report.md/.json.

    records: text records (kdjax.data.Record) for calibration and the held-out set; not needed for
    RTN without a report. source: what the model was loaded from, for the report. log: where
    progress lines, the table and one example generation of each model go.
    Returns {"qm": the QuantizedModel, "sizes": model_sizes, "float", "int4": measure() before and
    after (None without report), "table": the Markdown table}.
    """
    check_inputs(model, tokenizer, records, options)
    o = options
    train, held_out = train_and_held_out(records, o) if o.needs_data else ([], [])
    before = prompts = None
    if o.report:
        room = min(o.eval_length, model.config.max_position_embeddings - o.max_new_tokens)
        prompts = prompts_that_fit(held_out, tokenizer, room=room, limit=o.rouge_samples, template=o.template)
        before = measure(model, tokenizer, held_out, prompts, options=o)
    act = ", act-order" if o.desc_act and o.method == "gptq" else ""
    n_linears = sum(len(names) for _, names in model.config.family.linear_sets)
    log(f"quantizing the {n_linears} linears of {len(model.layers)} layers: {o.method}, {o.bits} bits, "
        f"group {o.group_size}, {'sym' if o.sym else 'asym'}{act}")
    calib = None
    if o.method == "gptq":
        calib = calibration_ids(train, tokenizer, num_rows=o.calib_samples, length=o.calib_length,
                                template=o.template)
        log(f"calibration: {calib.shape[0]} rows x {calib.shape[1]} tokens from the {len(train)} train records")
    qm = quantize_model(model, calib, method=o.method, bits=o.bits, group_size=o.group_size, sym=o.sym,
                        desc_act=o.desc_act, percdamp=o.damp_percent, batch_size=o.batch_size,
                        mse=range_search(o.mse, o.method))
    save_gptq(model, qm, out, tokenizer=tokenizer, dtype=o.float_dtype)
    log(f"wrote {out} (GPTQ checkpoint; {qm.method} took {qm.seconds:.1f} s)")
    sizes = model_sizes(model, qm, out, o.float_dtype)
    after = None
    if o.report:
        int4, _ = load_gptq(out, dtype="float32")  # what the checkpoint holds, read back
        after = measure(int4, tokenizer, held_out, prompts, options=o)
    table = report_table(sizes, qm, before, after)
    log("\n" + table)
    for tag, measured in (("float", before), ("int4", after)):
        for sample in (measured or {}).get("samples", [])[:1]:
            log(f"{tag} example ({sample['source']}): {sample['generation'][:200]!r}")
    if o.report:
        result = {"source": source, "out": out, "method": qm.method, "bits": qm.bits, "group_size": qm.group_size, "sym": qm.sym,
                  "desc_act": qm.desc_act, "damp_percent": qm.percdamp, "mse": qm.mse, "calib_tokens": qm.calib_tokens,
                  "quantize_seconds": qm.seconds, "sizes": sizes, "float": before, "int4": after}
        with open(os.path.join(out, REPORT + ".md"), "w", encoding="utf-8") as f:
            f.write(table)
        with open(os.path.join(out, REPORT + ".json"), "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2, ensure_ascii=False)
        log(f"wrote {os.path.join(out, REPORT)}.md and .json")
    return {"qm": qm, "sizes": sizes, "float": before, "int4": after, "table": table}
