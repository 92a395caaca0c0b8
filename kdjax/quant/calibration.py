"""GPTQ calibration rows from text records: the records' tokens joined and cut into windows.

GPTQ calibrates on windows of running text, as AutoGPTQ cuts C4 or WikiText into rows: no
padding, every token counts. Here the text of a record is its prompt (in the template the model
is trained and evaluated with) + its response + EOS, as `kdjax.data.tokenize` renders it.
"""
from __future__ import annotations

import warnings
from typing import Any, Sequence

import numpy as np

from kdjax import data

_CHUNK = 64  # records tokenized at a time: stop as soon as the windows are full


def calibration_ids(records: Sequence[data.Record], tokenizer: Any, *, num_rows: int, length: int,
                    template: str) -> np.ndarray:
    """input_ids int32 [N, length], N = min(num_rows, tokens available // length): the token
    streams of `records` in order, joined and cut into windows. Records whose prompt does not fit
    in `length` tokens are skipped; a response longer than the room left is cut.

    Raises ValueError when the records give fewer than `length` tokens.
    """
    if num_rows < 1 or length < 1:
        raise ValueError(f"calibration_ids: num_rows={num_rows}, length={length}; both must be >= 1")
    need = num_rows * length
    stream: list[int] = []
    for start in range(0, len(records), _CHUNK):
        with warnings.catch_warnings():  # long prompts are skipped and long responses cut, as expected here
            warnings.simplefilter("ignore")
            examples = data.tokenize(records[start:start + _CHUNK], tokenizer, max_length=length,
                                     template=template, on_long_prompt="skip")
        for ex in examples:
            stream.extend(ex.prompt_ids + ex.response_ids)
        if len(stream) >= need:
            break
    n = min(num_rows, len(stream) // length)
    if n == 0:
        raise ValueError(f"calibration_ids: {len(records)} records give {len(stream)} tokens, fewer than one "
                         f"row of length={length}")
    return np.asarray(stream[:n * length], np.int32).reshape(n, length)
