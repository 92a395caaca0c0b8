"""Quantization-aware distillation (QAD): the model learns on the int4 grid it is served on, taught
by its own float original (--config.quant.teacher=self) or by --config.teacher.

The model (--config.student, or --config.teacher when empty) is quantized to int4 (RTN or GPTQ:
--config.quant.start, .bits, .group_size, .sym, .desc_act: the grid of `kdjax quantize`), then
trained with KD's loss through fake quantization on that grid (straight-through gradients; the
latent weights with --config.quant.train_weights, the scales and zero points with
--config.quant.train_scales). Writes out_dir/int4 (a GPTQ checkpoint: transformers + gptqmodel
load it, `kdjax export --format=gptq` re-packs it) and a report of the float model, the start and
QAD (Rouge-L, validation loss, retention, size). No flags: SmolLM2-135M-Instruct from pip, on CPU.
In `kdjax distill`, --config.quant.aware=True runs QAD on the distilled student and
--config.quant.report=True adds the int4 rows to its report.
"""
import os

import kdjax.qad_config
from kdjax.commands.train_flags import command

main, FLAG_MODULES = command("qad", os.path.abspath(kdjax.qad_config.__file__))  # --config, --resume, --overwrite, --distributed
