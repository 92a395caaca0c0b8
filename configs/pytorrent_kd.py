"""PyTorrent KD on code: Qwen2.5-1.5B-Instruct -> Qwen2.5-0.5B-Instruct, docstring -> function body.

bugnet_kd.py on PyTorrent's Python functions: the prompt is a function's signature and docstring,
the response its body, as plain text (code completion, no chat template):

    kdjax distill --config=configs/pytorrent_kd.py --config.data.source=/data/pytorrent.jsonl.gz
    kdjax distill --config=configs/pytorrent_kd.py:5e-5 --config.data.source=...

PyTorrent is published as .jsonl.gz shards in the CodeSearchNet schema (docstring, code, ...),
not as a hub dataset: concatenate the shards you want into one file
(`cat train/*.jsonl.gz > pytorrent.jsonl.gz`) and point data.source at it. With
--config.data.source="" the same kind of pairs are extracted from this machine's Python standard
library (the default job's data, no download).
"""
from kdjax.train_config import sibling

bugnet_kd = sibling(__file__, "bugnet_kd")


def get_config(lr: str = bugnet_kd.DEFAULT_LR):
    c = bugnet_kd.get_config(lr, name="pytorrent_kd")
    c.data.source = "data/pytorrent.jsonl.gz"  # a local .jsonl/.json/.parquet file (.gz too)
    c.data.layout = "pytorrent"
    c.data.template = "plain"
    c.data.limit = 100_000  # the first 100k usable functions of the file (~1 epoch of 3,000 steps)
    return c
