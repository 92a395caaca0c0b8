"""GPTQ export of a tiny random Qwen2 (and Qwen3): read back by an independent torch dequantizer
written from the format spec, and loaded by transformers + optimum + gptqmodel on CPU; logits vs
kdjax's int4 model (the AQT layers). A checkpoint with the classic zero-point bug must fail the same check."""
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import load_file, save_file

from kdjax.config import ModelConfig
from kdjax.model import CausalLM
from kdjax.quant.aqt_pass import to_int4_model
from kdjax.quant.export_gptq import save_gptq
from kdjax.quant.quantize import quantize_model
from test_quant_common import logits, tiny_gptq

HAS_GPTQ_LOADER = all(importlib.util.find_spec(m) is not None for m in ("gptqmodel", "optimum"))


def rel_err(a, b):
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


CASES = ("sym_act", "asym", "asym_act")  # act-order GPTQ, RTN with a zero point per group, and both


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model, ids, gptq_act = tiny_gptq()  # GPTQ with act-order: g_idx not monotone
    asym = quantize_model(model, method="rtn", group_size=32, sym=False)  # zero points that vary
    asym_act = quantize_model(model, ids, method="gptq", group_size=32, desc_act=True, sym=False)  # `kdjax qad`'s grid
    out = {}
    for name, qm in {"sym_act": gptq_act, "asym": asym, "asym_act": asym_act}.items():
        dst = str(tmp_path_factory.mktemp(name))
        save_gptq(model, qm, dst, dtype="float32")
        out[name] = (dst, np.asarray(logits(to_int4_model(model, qm), ids)), qm)
    return model.config, np.asarray(ids), out


@pytest.fixture(scope="module")
def tiny_qwen3(tmp_path_factory):
    """(ids, GPTQ dir, kdjax int4 logits) of a tiny random Qwen3 (q_norm/k_norm, head_dim 32 != 64 / 4),
    GPTQ with act-order in groups of 32; its norms are random so that a mix-up of them would show."""
    cfg = ModelConfig.preset("tiny-qwen3")
    model = CausalLM(cfg, seed=4)
    keys = iter(jax.random.split(jax.random.key(4), 64))
    for path, var in nnx.to_flat_state(nnx.state(model)):
        if path[-1] == "scale":
            var.set_value(1 + 0.2 * jax.random.normal(next(keys), var.shape))
    ids = jax.random.randint(jax.random.key(5), (4, 16), 0, cfg.vocab_size)
    qm = quantize_model(model, ids, method="gptq", group_size=32, desc_act=True)
    dst = str(tmp_path_factory.mktemp("qwen3"))
    save_gptq(model, qm, dst, dtype="float32")
    return np.asarray(ids), dst, np.asarray(logits(to_int4_model(model, qm), ids))


def unpack_rows_torch(p, bits=4):
    """Spec reading of a packed int32 tensor: value j of word w is (w >> bits*j) & (2**bits - 1)."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    return ((p[:, None, :] >> shifts[None, :, None]) & (2 ** bits - 1)).reshape(-1, p.shape[1])


def spec_dequantize(t, prefix, bits=4):
    """torch weight [out, in] from qweight/qzeros/scales/g_idx, GPTQ v1: stored zero = zero - 1
    (gptqmodel adds 0x11111111 to each qzeros word when it loads v1)."""
    qweight, scales, g_idx = t[prefix + ".qweight"], t[prefix + ".scales"], t[prefix + ".g_idx"].long()
    words = (t[prefix + ".qzeros"].to(torch.int64) + 0x11111111) & 0xFFFFFFFF
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)
    zeros = unpack_rows_torch(words.T.contiguous(), bits).T
    codes = unpack_rows_torch(qweight, bits)
    w = scales.float()[g_idx] * (codes.float() - zeros.float()[g_idx])
    return w.T.contiguous()


def spec_logits(t, conf, ids):
    """Logits of a plain transformers model (nn.Linear) holding the spec reading of the GPTQ tensors
    `t`; conf: the checkpoint's config.json without quantization_config."""
    from transformers import AutoConfig, AutoModelForCausalLM
    state = {}
    for name in t:
        if name.endswith(".qweight"):
            prefix = name[:-len(".qweight")]
            state[prefix + ".weight"] = spec_dequantize(t, prefix)
        elif not name.endswith((".qzeros", ".scales", ".g_idx")):
            state[name] = t[name]
    conf = dict(conf)
    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(conf.pop("model_type"), **conf))
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    hf.tie_weights()
    with torch.no_grad():
        return hf(torch.tensor(ids)).logits.numpy()


@pytest.mark.parametrize("case", CASES)
def test_spec_dequantizer_in_transformers_matches_kdjax_int4(tiny, case):
    cfg, ids, out = tiny
    dst, int4_logits, qm = out[case]
    conf = json.load(open(os.path.join(dst, "config.json")))
    qc = conf.pop("quantization_config")
    assert qc["quant_method"] == "gptq" and qc["bits"] == 4 and qc["group_size"] == 32
    assert qc["checkpoint_format"] == "gptq" and qc["desc_act"] == case.endswith("_act")
    assert qc["sym"] == case.startswith("sym")
    assert json.load(open(os.path.join(dst, "quantize_config.json"))) == qc
    t = load_file(os.path.join(dst, "model.safetensors"))
    assert t["model.layers.0.self_attn.q_proj.qweight"].shape == (64 // 8, 64)
    assert t["model.layers.1.self_attn.k_proj.qzeros"].shape == (2, 32 // 8)
    assert t["model.layers.0.mlp.down_proj.scales"].dtype == torch.float16
    if case.endswith("_act"):
        assert not torch.equal(t["model.layers.0.mlp.down_proj.g_idx"], torch.arange(128) // 32)
    assert rel_err(spec_logits(t, conf, ids), int4_logits) < 1e-4


def test_qwen3_export_read_by_the_spec_dequantizer_matches_kdjax_int4(tiny_qwen3):
    ids, dst, int4_logits = tiny_qwen3
    conf = json.load(open(os.path.join(dst, "config.json")))
    conf.pop("quantization_config")
    assert conf["architectures"] == ["Qwen3ForCausalLM"] and conf["head_dim"] == 32
    t = load_file(os.path.join(dst, "model.safetensors"))
    assert t["model.layers.0.self_attn.q_proj.qweight"].shape == (64 // 8, 128)  # 4 heads x 32
    assert t["model.layers.0.self_attn.o_proj.qweight"].shape == (128 // 8, 64)
    assert t["model.layers.1.self_attn.k_norm.weight"].shape == (32,)  # norms stay float
    assert rel_err(spec_logits(t, conf, ids), int4_logits) < 1e-4


@pytest.fixture
def restore_environ():
    """Importing gptqmodel (through tokenicer) rewrites HF_HOME, HF_HUB_CACHE and friends; put the
    environment back so later tests in the session see the one they started with."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def gptqmodel_logits(path, ids, backend="torch"):
    """Logits of the GPTQ checkpoint at `path` as transformers + gptqmodel run it (GPTQ kernels)."""
    from transformers import AutoModelForCausalLM, GPTQConfig
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                              quantization_config=GPTQConfig(bits=4, backend=backend))
    assert hasattr(hf.model.layers[0].mlp.down_proj, "qweight")  # a GPTQ kernel, not nn.Linear
    with torch.no_grad():
        return hf(torch.tensor(ids)).logits.numpy()


@pytest.mark.skipif(not HAS_GPTQ_LOADER, reason="gptqmodel + optimum not installed (optimum==2.3.0, gptqmodel==7.6.0)")
def test_transformers_gptqmodel_loads_export_and_wrong_zero_fails(tiny, tmp_path, restore_environ):
    cfg, ids, out = tiny

    def hf_logits(path, backend):
        return gptqmodel_logits(path, ids, backend)

    for case in CASES:
        dst, int4_logits, _ = out[case]
        err = rel_err(hf_logits(dst, "torch"), int4_logits)
        assert err < 1e-2, (case, err)

    # The classic bug: qzeros packed without v1's "- 1". gptqmodel then reads zero + 1.
    dst, int4_logits, _ = out["sym_act"]
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in ("config.json", "quantize_config.json"):
        (bad / f).write_text(open(os.path.join(dst, f)).read())
    t = load_file(os.path.join(dst, "model.safetensors"))
    for name in t:
        if name.endswith(".qzeros"):
            t[name] = t[name] + 0x11111111
    save_file(t, str(bad / "model.safetensors"), metadata={"format": "pt"})
    err = rel_err(hf_logits(str(bad), "torch"), int4_logits)
    assert err > 1e-2, err


@pytest.mark.skipif(not HAS_GPTQ_LOADER, reason="gptqmodel + optimum not installed (optimum==2.3.0, gptqmodel==7.6.0)")
def test_qwen3_export_loads_in_transformers_gptqmodel(tiny_qwen3, restore_environ):
    ids, dst, int4_logits = tiny_qwen3
    err = rel_err(gptqmodel_logits(dst, ids), int4_logits)
    assert err < 1e-2, err


def test_read_back_gives_the_same_int4_model(tiny):
    from kdjax.quant.export_gptq import load_gptq
    cfg, ids, out = tiny
    for case in CASES:
        dst, int4_logits, qm = out[case]
        model, back = load_gptq(dst)
        assert sorted(back.linears) == sorted(qm.linears) and back.sym == qm.sym and back.desc_act == qm.desc_act
        for p, q in qm.linears.items():
            for f in ("codes", "scales", "zeros", "g_idx"):
                np.testing.assert_array_equal(getattr(back.linears[p], f), getattr(q, f))
        np.testing.assert_array_equal(np.asarray(logits(model, ids)), int4_logits)
