"""The Flax decoder of every family (Qwen2, Llama, Qwen3) against transformers in PyTorch (fp32),
decoding, and checkpoint round trips."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import kdjax
from kdjax import checkpoint
from kdjax.config import PRESETS, REMAT_POLICIES, ModelConfig
from kdjax.generate import generate

CONFIGS = {
    "qwen2-tied": ModelConfig.preset("tiny-qwen2"),
    "qwen2-untied": ModelConfig.preset("tiny-qwen2", tie_word_embeddings=False),
    "llama-untied-nobias": ModelConfig.preset("tiny-llama"),
    "llama-tied-bias": ModelConfig.preset("tiny-llama", tie_word_embeddings=True, qkv_bias=True, num_kv_heads=4),
    "qwen3-tied": ModelConfig.preset("tiny-qwen3"),  # head_dim 32 != hidden / heads = 16
    "qwen3-untied-bias": ModelConfig.preset("tiny-qwen3", tie_word_embeddings=False, qkv_bias=True, num_kv_heads=1,
                                            head_dim=8),
}


def torch_model(cfg, seed):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**cfg.to_hf()))
    with torch.no_grad():  # HF initialises biases and norms to constants: randomise so they are tested
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.float().eval()


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    cfg = CONFIGS[request.param]
    tm = torch_model(cfg, seed=len(request.param))
    d = str(tmp_path_factory.mktemp(request.param))
    tm.save_pretrained(d)
    model, _ = kdjax.load(d)
    return cfg, tm, model, d


def torch_logits(tm, ids, mask=None):
    with torch.no_grad():
        kw = {} if mask is None else {"attention_mask": torch.tensor(mask)}
        return tm(torch.tensor(ids), **kw).logits.numpy()


def test_logits_match_transformers(pair):
    cfg, tm, model, _ = pair
    ids = np.random.default_rng().integers(0, cfg.vocab_size, (3, 23))
    ref = torch_logits(tm, ids)
    out = np.asarray(model(jnp.asarray(ids)))
    assert out.shape == (3, 23, cfg.vocab_size)
    assert np.abs(out - ref).max() < 1e-4


def test_layer_states_match_transformers_hidden_states(pair):
    """hidden_states(layers=True): the residual stream after each decoder layer, as transformers'
    output_hidden_states gives it (whose last entry has the final norm applied)."""
    cfg, tm, model, _ = pair
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 11))
    with torch.no_grad():
        ref = [x.numpy() for x in tm(torch.tensor(ids), output_hidden_states=True).hidden_states]
    h, states = model.hidden_states(jnp.asarray(ids), layers=True)
    assert len(states) == cfg.num_layers == len(ref) - 1
    for i, x in enumerate(states[:-1]):
        np.testing.assert_allclose(np.asarray(x), ref[i + 1], rtol=1e-4, atol=1e-4, err_msg=f"layer {i}")
    np.testing.assert_allclose(np.asarray(h), ref[-1], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(model.norm(states[-1])), ref[-1], rtol=1e-4, atol=1e-4)


def test_config_maps_from_hf(pair):
    cfg, tm, model, d = pair
    assert model.config == ModelConfig.from_hf(json.load(open(os.path.join(d, "config.json"))))
    assert model.config.qkv_bias == cfg.qkv_bias and model.config.tie_word_embeddings == cfg.tie_word_embeddings


def test_left_padded_batch_matches_unpadded_rows(pair):
    cfg, tm, model, _ = pair
    rng = np.random.default_rng()
    lens = [5, 11, 8]
    rows = [rng.integers(1, cfg.vocab_size, n) for n in lens]
    ids = np.zeros((3, 11), np.int32)
    mask = np.zeros((3, 11), np.int32)
    for r, row in enumerate(rows):
        ids[r, 11 - len(row):], mask[r, 11 - len(row):] = row, 1
    out = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    for r, row in enumerate(rows):
        ref = torch_logits(tm, row[None])[0]
        np.testing.assert_allclose(out[r, 11 - len(row):], ref, atol=1e-4)


def test_greedy_kv_cache_equals_full_forward_argmax(pair):
    cfg, _, model, _ = pair
    rng = np.random.default_rng()
    prompts = [list(rng.integers(1, cfg.vocab_size, n)) for n in (3, 9, 6)]
    out = generate(model, prompts, max_new_tokens=32, temperature=0.0)
    # The reference: full forward passes without a cache. Right padding leaves the causal logits of
    # earlier positions unchanged, so one compiled shape serves every step.
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, ids: nnx.merge(graphdef, s)(ids))
    width = 9 + 32
    for prompt, new in zip(prompts, out):
        assert len(new) == 32
        seq = list(prompt)
        for tok in new:
            logits = np.asarray(forward(state, jnp.asarray([seq + [0] * (width - len(seq))])))[0, len(seq) - 1]
            assert tok == int(np.argmax(logits))
            seq.append(tok)


def test_hf_round_trip_is_bit_identical_and_loads_in_transformers(pair, tmp_path):
    cfg, tm, model, src = pair
    kdjax.save(model, str(tmp_path), format="hf")
    a = dict(checkpoint.iter_hf_dir(src))
    b = dict(checkpoint.iter_hf_dir(str(tmp_path)))
    a.pop("lm_head.weight", None) if cfg.tie_word_embeddings else None
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).float().eval()
    ids = np.random.default_rng().integers(0, cfg.vocab_size, (2, 13))
    np.testing.assert_allclose(torch_logits(back, ids), np.asarray(model(jnp.asarray(ids))), atol=1e-4)


def test_kdjax_checkpoint_round_trip(pair, tmp_path):
    cfg, _, model, _ = pair
    kdjax.save(model, str(tmp_path / "ck"), format="kdjax")
    again, _ = kdjax.load(str(tmp_path / "ck"))
    ids = jnp.asarray(np.random.default_rng().integers(0, cfg.vocab_size, (1, 9)))
    assert again.config == model.config
    np.testing.assert_array_equal(np.asarray(again(ids)), np.asarray(model(ids)))


def test_bf16_close_to_fp32(pair):
    cfg, _, model, d = pair
    low, _ = kdjax.load(d, dtype="bfloat16")
    assert low.embed_tokens.embedding[...].dtype == jnp.bfloat16
    ids = jnp.asarray(np.random.default_rng().integers(0, cfg.vocab_size, (1, 9)))
    ref = np.asarray(model(ids))
    out = np.asarray(low(ids).astype(jnp.float32))
    assert np.abs(out - ref).max() < 0.05 * np.abs(ref).max()


def test_fused_attention_matches_transformers(pair):
    """attention="jax" (jax.nn.dot_product_attention) on plain causal, left-padded and cached input."""
    cfg, tm, _, d = pair
    model, _ = kdjax.load(d, attention="jax")
    assert model.config.attention == "jax"
    rng = np.random.default_rng()
    ids = rng.integers(0, cfg.vocab_size, (3, 23))
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), torch_logits(tm, ids), atol=1e-4)
    row = rng.integers(1, cfg.vocab_size, 7)
    padded, mask = np.zeros((1, 12), np.int32), np.zeros((1, 12), np.int32)
    padded[0, 5:], mask[0, 5:] = row, 1
    out = np.asarray(model(jnp.asarray(padded), attention_mask=jnp.asarray(mask)))[0, 5:]
    np.testing.assert_allclose(out, torch_logits(tm, row[None])[0], atol=1e-4)
    prompts = [list(rng.integers(1, cfg.vocab_size, n)) for n in (3, 9)]
    xla, _ = kdjax.load(d)
    assert generate(model, prompts, max_new_tokens=8) == generate(xla, prompts, max_new_tokens=8)


@pytest.mark.parametrize("impl", ["xla", "jax", "auto"])
def test_packed_row_matches_separate_sequences(pair, impl):
    """segment_ids: sequences packed end to end in one row attend only inside their own segment."""
    cfg, tm, _, d = pair
    model, _ = kdjax.load(d, attention=impl)
    rng = np.random.default_rng()
    seqs = [rng.integers(1, cfg.vocab_size, n) for n in (6, 9, 4)]
    width = sum(map(len, seqs)) + 3
    ids, seg, pos = (np.zeros((1, width), np.int32) for _ in range(3))
    start = 0
    for i, s in enumerate(seqs):
        ids[0, start:start + len(s)], seg[0, start:start + len(s)] = s, i + 1
        pos[0, start:start + len(s)] = np.arange(len(s))
        start += len(s)
    out = np.asarray(model(jnp.asarray(ids), segment_ids=jnp.asarray(seg), positions=jnp.asarray(pos)))[0]
    start = 0
    for s in seqs:
        np.testing.assert_allclose(out[start:start + len(s)], torch_logits(tm, s[None])[0], atol=1e-4)
        start += len(s)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs a GPU")
def test_cudnn_attention_close_to_xla():
    cfg = ModelConfig.preset("tiny-qwen2", dtype="bfloat16", head_dim=64)
    ids = jnp.asarray(np.random.default_rng().integers(0, cfg.vocab_size, (2, 128)))
    ref = kdjax.Qwen2(cfg, seed=1)(ids).astype(jnp.float32)
    out = kdjax.Qwen2(cfg.replace(attention="cudnn"), seed=1)(ids).astype(jnp.float32)
    assert float(jnp.abs(out - ref).max()) < 0.05 * float(jnp.abs(ref).max())


def test_bad_runtime_options_are_named():
    with pytest.raises(ValueError, match="ModelConfig.attention='flash'"):
        ModelConfig.preset("tiny-qwen2", attention="flash")
    with pytest.raises(ValueError, match="ModelConfig.remat_policy='dots'"):
        ModelConfig.preset("tiny-qwen2", remat_policy="dots")


@pytest.mark.parametrize("policy", REMAT_POLICIES)
def test_remat_gives_same_gradients(policy):
    cfg = ModelConfig.preset("tiny-qwen2")
    ids = jnp.asarray(np.random.default_rng().integers(0, cfg.vocab_size, (2, 8)))

    def loss(m):
        return jnp.mean(m(ids) ** 2)

    g1 = nnx.jit(nnx.grad(loss))(kdjax.Qwen2(cfg, seed=3))
    g2 = nnx.jit(nnx.grad(loss))(kdjax.Qwen2(cfg.replace(remat=True, remat_policy=policy), seed=3))
    for a, b in zip(jax_leaves(g1), jax_leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def jax_leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_has_the_tensors_of_its_transformers_model(name):
    """Each preset's config.json builds a transformers model (on the meta device: no memory) whose
    state dict is the family table's HF names and shapes of kdjax's parameters, and whose parameter
    count is num_params()."""
    cfg = ModelConfig.preset(name)
    with torch.device("meta"):
        tm = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**cfg.to_hf()))
    assert type(tm).__name__ == cfg.family.hf_architecture
    want = {k: tuple(v.shape) for k, v in tm.state_dict().items()}
    if cfg.tie_word_embeddings:
        del want["lm_head.weight"]  # the embedding, shared
    got = {}
    for path, var in nnx.to_flat_state(nnx.state(nnx.eval_shape(lambda: kdjax.CausalLM(cfg)))):
        hf_name, transpose = cfg.family.hf_name(".".join(map(str, path)))
        got[hf_name] = tuple(reversed(var.shape)) if transpose else tuple(var.shape)
    assert got == want
    assert cfg.num_params() == sum(p.numel() for p in tm.parameters())


# ---- bad input --------------------------------------------------------------------------------
def test_unsupported_architecture_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(ValueError, match=r"config\.json: unsupported architecture.*GPT2LMHeadModel"):
        kdjax.load(str(tmp_path))


def test_missing_and_truncated_shards_are_clear_errors(tmp_path):
    cfg = CONFIGS["qwen2-untied"]
    tm = torch_model(cfg, seed=1)
    d = tmp_path / "sharded"
    tm.save_pretrained(str(d), max_shard_size="100KB")
    shards = sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))
    assert len(shards) > 2 and (d / "model.safetensors.index.json").exists()
    model, _ = kdjax.load(str(d))  # sharded loading works
    ids = np.random.default_rng().integers(0, cfg.vocab_size, (1, 7))
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), torch_logits(tm, ids), atol=1e-4)

    victim = d / shards[1]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ValueError, match=rf"{shards[1]}: truncated safetensors file"):
        kdjax.load(str(d))
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=rf"{shards[1]}: shard listed in .*index.json is missing"):
        kdjax.load(str(d))


def test_wrong_shapes_and_missing_tensors_are_clear_errors(tmp_path):
    cfg = CONFIGS["qwen2-tied"]
    tm = torch_model(cfg, seed=2)
    tm.save_pretrained(str(tmp_path))
    hf = json.loads((tmp_path / "config.json").read_text())
    hf["intermediate_size"] = 96
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match=r"tensor 'model\.layers\.0\.mlp\.\w+_proj\.weight' has shape"):
        kdjax.load(str(tmp_path))
    hf["intermediate_size"] = cfg.intermediate_size
    hf["num_hidden_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match=r"missing tensors for model\.layers\.2\."):
        kdjax.load(str(tmp_path))


def test_prompt_longer_than_context_is_a_clear_error():
    model = kdjax.Qwen2(ModelConfig.preset("tiny-qwen2", max_position_embeddings=64))
    with pytest.raises(ValueError, match=r"prompt of 60 tokens plus max_new_tokens=10 exceeds the model's context of 64"):
        generate(model, [[1] * 60], max_new_tokens=10)


def test_unknown_sources_are_clear_errors(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"org-x/model-y: not a local path or preset.*local HF directory"):
        kdjax.load("org-x/model-y")
    with pytest.raises(FileNotFoundError, match=r"no-such-model: no such model directory or file, and not a "
                                                 r"preset name \(presets: smollm2-135m-instruct\)"):
        kdjax.load("no-such-model")
    with pytest.raises(FileNotFoundError, match=r"missing.gguf: no such GGUF file"):
        kdjax.load("missing.gguf")


def test_low_precision_matmul_sums_in_fp32_and_its_backward_stays_bf16_on_cpu():
    """kdjax.model.matmul in bf16: forward and both gradients equal float64 numpy's, rounded once to
    bf16 (at most one bf16 ulp apart: the sum order differs), and every dot of the backward takes two
    bf16 operands (a float32 cotangent would run it on XLA:CPU's float32 path); traced for a TPU
    (kdjax.plan's programs) it is the plain bf16 dot."""
    from kdjax.model import matmul, target_platform
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 24, 96)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((96, 80)) * 0.1, jnp.bfloat16)
    c = jnp.asarray(rng.standard_normal((2, 24, 80)), jnp.bfloat16)
    f = lambda x, w: jnp.sum((matmul(x, w) * c).astype(jnp.float32))
    y, (gx, gw) = jax.jit(lambda x, w: (matmul(x, w), jax.grad(f, (0, 1))(x, w)))(x, w)
    x64, w64, c64 = (np.asarray(a, np.float64) for a in (x, w, c))
    ref_c = np.asarray(jnp.asarray(c64, jnp.float32).astype(jnp.bfloat16), np.float64)  # the cotangent, bf16
    for got, want in ((y, x64 @ w64), (gx, ref_c @ w64.T), (gw, np.einsum("btk,btn->kn", x64, ref_c))):
        assert got.dtype == jnp.bfloat16 and got.shape == want.shape
        rounded = np.asarray(jnp.asarray(want, jnp.float32).astype(jnp.bfloat16), np.float64)
        ulp = np.abs(rounded) * 2.0 ** -7 + 1e-30
        assert np.all(np.abs(np.asarray(got, np.float64) - rounded) <= ulp)
        assert np.mean(np.asarray(got, np.float64) == rounded) > 0.99
    def dots(jaxpr):  # every dot_general, inside nested jaxprs too
        for e in jaxpr.eqns:
            if e.primitive.name == "dot_general":
                yield e
            for p in e.params.values():
                inner = getattr(p, "jaxpr", p)
                if hasattr(inner, "eqns"):
                    yield from dots(inner)
    found = list(dots(jax.make_jaxpr(jax.grad(f, (0, 1)))(x, w).jaxpr))
    assert len(found) == 3  # forward, d/dx, d/dw
    for e in found:
        assert [v.aval.dtype for v in e.invars] == [jnp.bfloat16] * 2, e
        assert e.params["preferred_element_type"] == jnp.float32, e
    with target_platform("tpu"):  # traced for a TPU (kdjax.plan): the plain dot, which remat's dots_* policies see
        plain = list(dots(jax.make_jaxpr(jax.grad(f, (0, 1)))(x, w).jaxpr))
    assert len(plain) == 3 and all(e.params["preferred_element_type"] == jnp.bfloat16 for e in plain)
    y32 = matmul(x.astype(jnp.float32), w.astype(jnp.float32))
    np.testing.assert_allclose(np.asarray(y32), x64 @ w64, rtol=1e-5, atol=1e-5)
