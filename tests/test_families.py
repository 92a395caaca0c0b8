"""kdjax.families: the tensor table's three names against the `gguf` package's own name map, both
directions of every lookup, and the family of a config.json. (Each family's model against
transformers: tests/test_model.py; its GGUF files: tests/test_gguf.py; its GPTQ export:
tests/test_quant_export.py.)"""
import gguf
import pytest

from kdjax.families import FAMILIES, TENSORS, family_of_hf_config


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_gguf_names_are_llama_cpps(name):
    """llama.cpp's converters name tensors by gguf's TensorNameMap, keyed by the HF module name."""
    arch = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[name]
    names = gguf.get_tensor_name_map(arch, 4)
    for t in FAMILIES[name].tensors(bias=True, tied=False):
        for i in (0, 3):
            base, suffix = t.hf.format(i=i).rsplit(".", 1)
            assert f"{names.get_name(base)}.{suffix}" == t.gguf.format(i=i), t


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_names_go_both_ways(name):
    fam = FAMILIES[name]
    for t in fam.tensors(bias=True, tied=False):
        for i in (0, 7, 12):
            path, hf = t.kdjax.format(i=i), t.hf.format(i=i)
            assert fam.kdjax_name(hf) == (path, path.endswith(".kernel"))
            assert fam.hf_name(path) == (hf, path.endswith(".kernel"))
    assert fam.hf_module("layers.12.mlp.down_proj") == "model.layers.12.mlp.down_proj"
    assert fam.linear_of_hf_module("model.layers.12.mlp.down_proj") == "layers.12.mlp.down_proj"
    assert fam.linear_of_hf_module("model.layers.12.input_layernorm") is None


def test_each_family_holds_its_own_tensors():
    def hf_names(name, **kw):
        return {t.hf.format(i=0) for t in FAMILIES[name].tensors(**kw)}
    o_bias, q_norm = "model.layers.0.self_attn.o_proj.bias", "model.layers.0.self_attn.q_norm.weight"
    assert o_bias not in hf_names("qwen2", bias=True, tied=True)  # Qwen2: q/k/v bias only
    assert o_bias in hf_names("llama", bias=True, tied=True) and o_bias in hf_names("qwen3", bias=True, tied=True)
    assert q_norm in hf_names("qwen3", bias=False, tied=True) and q_norm not in hf_names("llama", bias=True, tied=True)
    assert "lm_head.weight" in hf_names("qwen3", bias=False, tied=False)
    assert "lm_head.weight" not in hf_names("qwen3", bias=False, tied=True)
    assert FAMILIES["qwen2"].kdjax_name("model.layers.0.self_attn.q_norm.weight") is None
    with pytest.raises(KeyError, match="q_norm.scale.*qwen2"):
        FAMILIES["qwen2"].hf_name("layers.0.self_attn.q_norm.scale")
    assert len({t.kdjax for t in TENSORS}) == len({t.hf for t in TENSORS}) == len({t.gguf for t in TENSORS}) \
        == len(TENSORS)


def test_family_of_a_config():
    assert family_of_hf_config({"architectures": ["Qwen3ForCausalLM"]}).name == "qwen3"
    assert family_of_hf_config({"model_type": "llama"}).name == "llama"  # no architectures: by model_type
    with pytest.raises(ValueError, match=r"x/config\.json: unsupported architecture \['GPT2LMHeadModel'\].*"
                                         r"Qwen3ForCausalLM"):
        family_of_hf_config({"architectures": ["GPT2LMHeadModel"]}, "x/config.json")
