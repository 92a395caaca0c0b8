"""int4 weight quantization: the GPTQ grid, RTN, GPTQ in JAX, the AQT weight-only pass, GPTQ export.

    qm = quantize_model(model, calib_ids, method="gptq", bits=4, group_size=128)   # or "rtn"
    int4 = to_int4_model(model, qm)        # AQT int4 layers, for eval / serving in JAX
    save_gptq(model, qm, "out/")           # transformers + optimum + gptqmodel load it
    int4, qm = load_gptq("out/")           # and back into kdjax

    # `kdjax quantize` from Python: calibration rows from records, GPTQ, export, size/perplexity report
    result = quantize_with_report(model, tokenizer, "out/", records, QuantizeOptions(group_size=64, report=True))
"""
from kdjax.quant.grid import QuantizedLinear, find_params, pack, rtn, unpack
from kdjax.quant.gptq import gptq_layer, hessian_finalize, hessian_init, hessian_update, reconstruction_error
from kdjax.quant.quantize import QuantizedModel, check_group_size, quantize_model
from kdjax.quant.aqt_pass import Int4Linear, dequantized_model, to_int4_model
from kdjax.quant.export_gptq import (export_gptq, gptq_quantization_config, is_gptq_dir, load_gptq, read_gptq,
                                     save_gptq)
from kdjax.quant.calibration import calibration_ids
from kdjax.quant.report import QuantizeOptions, measure, model_sizes, quantize_with_report, report_table

__all__ = [
    "QuantizedLinear", "find_params", "pack", "rtn", "unpack",
    "gptq_layer", "hessian_finalize", "hessian_init", "hessian_update", "reconstruction_error",
    "QuantizedModel", "check_group_size", "quantize_model", "Int4Linear", "dequantized_model", "to_int4_model",
    "export_gptq", "gptq_quantization_config", "is_gptq_dir", "load_gptq", "read_gptq", "save_gptq",
    "calibration_ids", "QuantizeOptions", "measure", "model_sizes", "quantize_with_report", "report_table",
]
