"""kdjax: distil, RL-tune and int4-quantize LLMs in JAX/Flax.

    model, tokenizer = kdjax.load("smollm2-135m-instruct")
    logits = model(input_ids)                 # [batch, length, vocab]
    kdjax.save(model, "out/", format="hf")    # loads in transformers
"""
from kdjax.checkpoint import load, save
from kdjax.config import ModelConfig
from kdjax.model import CausalLM, Qwen2

__version__ = "0.1.0"
__all__ = ["load", "save", "ModelConfig", "CausalLM", "Qwen2"]
