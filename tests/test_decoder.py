"""Tests of the prefix decoder LM, its attention / KV cache and the logical-sharding constraint.

Each test checks behaviour against an independent reference: a float64 NumPy re-implementation of the
whole stack, properties (causality, bidirectional prefix, padding invariance, cached == full forward,
RoPE relativity) or an equivalent construction (MQA == MHA with tiled K/V).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from spectron_jax.models import attention, sharding
from spectron_jax.models.decoder import (
    DECODER_PRESETS,
    Decoder,
    DecoderConfig,
    Embedder,
    GatedMLP,
    RMSNorm,
)

TINY = DecoderConfig(vocab_size=40, model_dim=16, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=8, mlp_dim=24)
GEMMA_LIKE = dataclasses.replace(
    TINY, block="sequential", activation="geglu", num_kv_heads=1, post_norms=True, qk_norm=True,
    rmsnorm_add_one=True, embed_scale_by_sqrt_dim=True, scale_tied_logits=False, final_logit_softcap=3.0,
    attn_logit_softcap=2.0, query_pre_attn_scalar=12.0, attention_pattern=("local", "global"), sliding_window=3,
    rope_fraction=0.5, local_rope_base=100.0)


def make_decoder(cfg, seed=0, randomize_norms=True):
    """A decoder whose norm scales are random too (so that a misplaced norm cannot go unnoticed)."""
    model = Decoder(cfg, rngs=nnx.Rngs(seed))
    if randomize_norms:
        keys = iter(jax.random.split(jax.random.key(seed + 100), 1000))
        offset = 0.0 if cfg.rmsnorm_add_one else 1.0
        set_params(model, lambda name, v: offset + 0.3 * jax.random.normal(next(keys), v.shape, v.dtype)
                   if name == "scale" else v)
    return model


def set_params(model, fn):
    """Replaces every parameter by fn(parameter name, value)."""
    state = nnx.state(model, nnx.Param)
    pure = jax.tree_util.tree_map_with_path(lambda path, v: fn(path[-1].key, v), state.to_pure_dict())
    state.replace_by_pure_dict(pure)
    nnx.update(model, state)


def params_of(model):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), nnx.state(model, nnx.Param).to_pure_dict())


# ------------------------------------------------------------------------------------------------
# NumPy reference (float64), written from the definitions, not from the module code
# ------------------------------------------------------------------------------------------------


def np_rmsnorm(x, scale, eps=1e-6, add_one=False):
    s = 1.0 + scale if add_one else scale
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * s


def np_rope(x, pos, base, fraction=1.0):
    """Complex-number form: (x_i + i x_{i+half}) * exp(i pos theta_i)."""
    h = x.shape[-1]
    rot = int(round(h * fraction))
    rot -= rot % 2
    half = rot // 2
    theta = base ** (-np.arange(half) * 2.0 / rot)
    z = (x[..., :half] + 1j * x[..., half:rot]) * np.exp(1j * pos[:, :, None, None] * theta)
    return np.concatenate([z.real, z.imag, x[..., rot:]], axis=-1)


def np_gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def np_silu(x):
    return x / (1.0 + np.exp(-x))


def np_mlp(x, p, activation):
    gate = x @ p["gate"]
    act = np_silu(gate) if activation == "swiglu" else np_gelu_tanh(gate)
    return (act * (x @ p["up"])) @ p["down"]


def np_softcap(x, cap):
    return x if cap is None else cap * np.tanh(x / cap)


def np_decoder(params, cfg, x, valid, is_prefix):
    """Hidden states [b, L, d] of the decoder, looping over the visibility rule literally."""
    b, L, _ = x.shape
    pos = np.maximum(np.cumsum(valid, axis=1) - 1, 0)
    base_mask = np.zeros((b, L, L), bool)
    for r in range(b):
        for i in range(L):
            for j in range(L):
                base_mask[r, i, j] = valid[r, j] and (j <= i or is_prefix[r, j])
    groups = cfg.num_heads // cfg.num_kv_heads
    norm = lambda z, s: np_rmsnorm(z, s, cfg.norm_eps, cfg.rmsnorm_add_one)  # noqa: E731
    for layer in range(cfg.num_layers):
        p = params["layers"][layer]
        local = cfg.attention_pattern[layer % len(cfg.attention_pattern)] == "local"
        mask = base_mask.copy()
        if local:
            mask &= np.abs(pos[:, :, None] - pos[:, None, :]) < cfg.sliding_window
        base = cfg.local_rope_base if (local and cfg.local_rope_base) else cfg.rope_base
        h = norm(x, p["attn_norm"]["scale"])
        a = p["attn"]
        q = np.einsum("bld,dnh->blnh", h, a["q"])
        k = np.einsum("bld,dnh->blnh", h, a["k"])
        v = np.einsum("bld,dnh->blnh", h, a["v"])
        if cfg.qk_norm:
            q = norm(q, a["q_norm"]["scale"])
            k = norm(k, a["k_norm"]["scale"])
        q = np_rope(q, pos, base, cfg.rope_fraction)
        k = np_rope(k, pos, base, cfg.rope_fraction)
        q = q * (cfg.query_pre_attn_scalar or cfg.head_dim) ** -0.5
        k = np.repeat(k, groups, axis=2)  # query head n reads kv head n // groups
        v = np.repeat(v, groups, axis=2)
        logits = np_softcap(np.einsum("binh,bjnh->bnij", q, k), cfg.attn_logit_softcap)
        logits = np.where(mask[:, None], logits, -np.inf)
        logits = logits - np.max(logits, axis=-1, keepdims=True)
        probs = np.exp(logits)
        probs = np.nan_to_num(probs / probs.sum(-1, keepdims=True))
        attn = np.einsum("bnij,bjnh,nhd->bid", probs, v, a["o"])
        if cfg.post_norms:
            attn = norm(attn, p["post_attn_norm"]["scale"])
        if cfg.block == "parallel":
            mlp = np_mlp(h, p["mlp"], cfg.activation)
            if cfg.post_norms:
                mlp = norm(mlp, p["post_mlp_norm"]["scale"])
            x = x + attn + mlp
        else:
            x = x + attn
            mlp = np_mlp(norm(x, p["mlp_norm"]["scale"]), p["mlp"], cfg.activation)
            if cfg.post_norms:
                mlp = norm(mlp, p["post_mlp_norm"]["scale"])
            x = x + mlp
    return norm(x, params["final_norm"]["scale"])


def np_embed(params, cfg, tokens):
    x = params["embedder"]["table"][tokens]
    return x * np.sqrt(cfg.model_dim) if cfg.embed_scale_by_sqrt_dim else x


def np_logits(params, cfg, hidden):
    if cfg.tie_embeddings:
        logits = hidden @ params["embedder"]["table"].T
        if cfg.scale_tied_logits:
            logits = logits * cfg.model_dim ** -0.5
    else:
        logits = hidden @ params["embedder"]["output"]
    return np_softcap(logits, cfg.final_logit_softcap)


def jitted_forward(model, deterministic=True):
    """jit(model.__call__) over (x, valid, is_prefix, cache, rngs), compiled once per shape."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, x, valid, is_prefix, cache, rngs):
        return nnx.merge(graphdef, state)(x, valid, is_prefix, deterministic=deterministic, cache=cache, rngs=rngs)

    return lambda x, valid, is_prefix, cache=None, rngs=None: forward(state, x, valid, is_prefix, cache, rngs)


def jitted_hidden(model):
    """x, valid, is_prefix -> NumPy hidden states of the full (uncached) forward."""
    forward = jitted_forward(model)
    return lambda x, valid, is_prefix: np.asarray(forward(x, valid, is_prefix)[0])


def row_layout(batch, length, prefix_len):
    valid = np.ones((batch, length), bool)
    is_prefix = np.broadcast_to(np.arange(length) < prefix_len, (batch, length)).copy()
    return valid, is_prefix


# ------------------------------------------------------------------------------------------------
# Whole-stack reference and properties
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [TINY, dataclasses.replace(TINY, num_kv_heads=2, tie_embeddings=False), GEMMA_LIKE],
                         ids=["parallel-mha", "parallel-gqa-untied", "sequential-gemma-options"])
def test_forward_matches_numpy_reference(cfg):
    model = make_decoder(cfg)
    params = params_of(model)
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (2, 9), 0, cfg.vocab_size))
    valid, is_prefix = row_layout(2, 9, prefix_len=3)
    valid[1, [1, 5]] = False  # padding inside the prefix and the text
    graphdef, state = nnx.split(model)

    @jax.jit
    def hidden_and_logits(state, tokens, valid, is_prefix):
        m = nnx.merge(graphdef, state)
        hidden, cache = m(m.embed(tokens), valid, is_prefix, deterministic=True)
        assert cache is None
        return hidden, m.logits(hidden)

    hidden, logits = hidden_and_logits(state, jnp.asarray(tokens), jnp.asarray(valid), jnp.asarray(is_prefix))
    assert logits.dtype == jnp.float32 and logits.shape == (2, 9, cfg.vocab_size)
    ref_hidden = np_decoder(params, cfg, np_embed(params, cfg, tokens), valid, is_prefix)
    np.testing.assert_allclose(np.asarray(hidden)[valid], ref_hidden[valid], rtol=2e-4, atol=2e-4)
    np.testing.assert_allclose(np.asarray(logits)[valid], np_logits(params, cfg, ref_hidden)[valid],
                               rtol=2e-4, atol=2e-4)


def test_causal_after_prefix_and_bidirectional_inside_it():
    model = make_decoder(TINY)
    x = jax.random.normal(jax.random.key(2), (2, 8, TINY.model_dim))
    valid, is_prefix = row_layout(2, 8, prefix_len=3)
    hidden = jitted_hidden(model)
    run = lambda inp: hidden(inp, valid, is_prefix)  # noqa: E731
    base = run(x)
    # A later, non-prefix position cannot influence any earlier output.
    for t in (3, 5, 7):
        out = run(x.at[:, t].add(5.0))
        np.testing.assert_allclose(out[:, :t], base[:, :t], atol=1e-6)
        assert np.abs(out[:, t] - base[:, t]).max() > 1e-3
    # Inside the prefix, the last prefix position does influence the first one.
    out = run(x.at[:, 2].add(5.0))
    assert np.abs(out[:, 0] - base[:, 0]).max() > 1e-3
    # Without the prefix flag, the same perturbation leaves position 0 alone (plain causal LM).
    no_prefix = np.zeros_like(is_prefix)
    causal_base = hidden(x, valid, no_prefix)
    causal_out = hidden(x.at[:, 2].add(5.0), valid, no_prefix)
    np.testing.assert_allclose(causal_out[:, :2], causal_base[:, :2], atol=1e-6)


@pytest.mark.parametrize("cfg", [TINY, GEMMA_LIKE], ids=["parallel", "sequential-sliding-window"])
def test_padding_inside_groups_is_invisible(cfg):
    model = make_decoder(cfg)
    prefix_len, text_len = 3, 5
    x = jax.random.normal(jax.random.key(3), (2, prefix_len + text_len, cfg.model_dim))
    valid, is_prefix = row_layout(2, prefix_len + text_len, prefix_len)
    hidden = jitted_hidden(model)
    contiguous = hidden(x, valid, is_prefix)

    # Padded layout: prefix slots [p0, PAD, p1, p2, PAD], text slots [t0, t1, PAD, PAD, t2, t3, t4, PAD].
    prefix_slots = [0, None, 1, 2, None]
    text_slots = [3, 4, None, None, 5, 6, 7, None]
    slots = prefix_slots + text_slots
    garbage = 100.0 * jax.random.normal(jax.random.key(4), (2, len(slots), cfg.model_dim))
    padded_x = np.array(garbage)
    padded_valid = np.array([s is not None for s in slots])
    padded_prefix = np.arange(len(slots)) < len(prefix_slots)
    for slot, source in enumerate(slots):
        if source is not None:
            padded_x[:, slot] = np.asarray(x[:, source])
    out = hidden(jnp.asarray(padded_x), np.broadcast_to(padded_valid, (2, len(slots))),
                 np.broadcast_to(padded_prefix, (2, len(slots))))
    np.testing.assert_allclose(out[:, padded_valid], contiguous, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# RoPE, MQA, MLP, RMSNorm, embedder
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_rope_matches_numpy_and_is_relative(fraction):
    q = jax.random.normal(jax.random.key(5), (1, 1, 2, 16))
    k = jax.random.normal(jax.random.key(6), (1, 1, 2, 16))

    def score(m, n):
        rq = attention.apply_rope(q, jnp.array([[m]]), base=10000.0, fraction=fraction)
        rk = attention.apply_rope(k, jnp.array([[n]]), base=10000.0, fraction=fraction)
        return np.asarray(jnp.sum(rq * rk, axis=-1))

    for m, n, c in [(3, 1, 7), (0, 5, 100), (10, 10, 33)]:
        np.testing.assert_allclose(score(m, n), score(m + c, n + c), rtol=1e-4, atol=1e-4)
    assert np.abs(score(3, 1) - score(4, 1)).max() > 1e-3  # but it does depend on the offset
    positions = np.array([[0, 1, 7, 250]])
    x = jax.random.normal(jax.random.key(7), (1, 4, 3, 16))
    got = attention.apply_rope(x, jnp.asarray(positions), base=500.0, fraction=fraction)
    want = np_rope(np.asarray(x, np.float64), positions, 500.0, fraction)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_mqa_equals_mha_with_shared_kv():
    mqa_cfg = dataclasses.replace(TINY, num_kv_heads=1)
    mha_cfg = dataclasses.replace(TINY, num_kv_heads=TINY.num_heads)
    mqa, mha = make_decoder(mqa_cfg), make_decoder(mha_cfg, seed=9)
    mqa_params = nnx.state(mqa, nnx.Param).to_pure_dict()
    state = nnx.state(mha, nnx.Param)
    state.replace_by_pure_dict(jax.tree_util.tree_map_with_path(
        lambda path, v: jnp.tile(v, (1, TINY.num_heads, 1)) if path[-1].key in ("k", "v") else v, mqa_params))
    nnx.update(mha, state)
    x = jax.random.normal(jax.random.key(8), (2, 7, TINY.model_dim))
    valid, is_prefix = row_layout(2, 7, prefix_len=2)
    np.testing.assert_allclose(jitted_hidden(mqa)(x, valid, is_prefix), jitted_hidden(mha)(x, valid, is_prefix),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activation", ["swiglu", "geglu"])
def test_gated_mlp_matches_numpy(activation):
    mlp = GatedMLP(6, 10, activation=activation, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(9), (2, 3, 6))
    p = {k: np.asarray(getattr(mlp, k)[...], np.float64) for k in ("gate", "up", "down")}
    np.testing.assert_allclose(np.asarray(mlp(x)), np_mlp(np.asarray(x, np.float64), p, activation),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("add_one", [False, True])
def test_rmsnorm_matches_numpy(add_one):
    norm = RMSNorm(5, eps=1e-6, add_one=add_one)
    np.testing.assert_array_equal(np.asarray(norm.scale[...]), np.zeros(5) if add_one else np.ones(5))
    scale = np.linspace(-0.5, 1.5, 5)
    norm.scale[...] = jnp.asarray(scale, jnp.float32)
    x = 3.0 * jax.random.normal(jax.random.key(10), (4, 5))
    want = np_rmsnorm(np.asarray(x, np.float64), scale, 1e-6, add_one)
    np.testing.assert_allclose(np.asarray(norm(x)), want, rtol=1e-5, atol=1e-5)
    assert norm(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16


def test_embedder_tied_shares_table_and_untied_has_projection():
    tied = Embedder(12, 8, tie=True, scale_by_sqrt_dim=True, rngs=nnx.Rngs(0))
    tokens = jnp.array([[0, 5, 11]])
    table = np.asarray(tied.table[...])
    np.testing.assert_allclose(np.asarray(tied.encode(tokens)), table[[0, 5, 11]][None] * np.sqrt(8), rtol=1e-6)
    h = jax.random.normal(jax.random.key(11), (1, 3, 8))
    np.testing.assert_allclose(np.asarray(tied.decode(h)), np.asarray(h) @ table.T / np.sqrt(8), rtol=1e-5,
                               atol=1e-5)
    assert "output" not in nnx.state(tied, nnx.Param).to_pure_dict()
    untied = Embedder(12, 8, tie=False, final_logit_softcap=2.0, rngs=nnx.Rngs(0))
    out = np.asarray(untied.output[...])
    np.testing.assert_allclose(np.asarray(untied.decode(h)), 2.0 * np.tanh(np.asarray(h) @ out / 2.0),
                               rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# KV cache: prefill + single steps == full forward
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [
    TINY,
    dataclasses.replace(TINY, block="sequential"),
    dataclasses.replace(TINY, num_kv_heads=2),
    dataclasses.replace(TINY, num_kv_heads=2, attention_pattern=("local", "global"), sliding_window=3),
], ids=["parallel", "sequential", "gqa", "sliding-window"])
def test_cached_decoding_equals_full_forward(cfg):
    model = make_decoder(cfg)
    batch, length, prefill, max_len = 2, 11, 6, 14
    x = jax.random.normal(jax.random.key(12), (batch, length, cfg.model_dim))
    valid, is_prefix = row_layout(batch, length, prefix_len=3)
    valid[1, 1] = False  # a padded prefix slot inside the prefill chunk
    valid[1, 8] = False  # row 1 has nothing to add at one decode step
    valid, is_prefix = jnp.asarray(valid), jnp.asarray(is_prefix)
    forward = jitted_forward(model)
    full, _ = forward(x, valid, is_prefix)

    cache = model.init_cache(batch, max_len)
    assert cache.layers[0].k.shape == (batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    outputs, cache = forward(x[:, :prefill], valid[:, :prefill], is_prefix[:, :prefill], cache)
    outputs = [outputs]
    for t in range(prefill, length):  # the same compiled step serves every position
        step, cache = forward(x[:, t:t + 1], valid[:, t:t + 1], is_prefix[:, t:t + 1], cache)
        outputs.append(step)
    cached = jnp.concatenate(outputs, axis=1)
    assert int(cache.end_index) == length
    np.testing.assert_array_equal(np.asarray(cache.num_valid()), np.asarray(valid.sum(1)))
    keep = np.asarray(valid)
    np.testing.assert_allclose(np.asarray(cached)[keep], np.asarray(full)[keep], rtol=1e-5, atol=1e-5)


def test_bfloat16_computation_tracks_float32():
    cfg32 = dataclasses.replace(TINY, num_kv_heads=2)
    cfg16 = dataclasses.replace(cfg32, dtype="bfloat16")
    m32, m16 = make_decoder(cfg32), make_decoder(cfg16)  # same seed: the same float32 parameters
    x = jax.random.normal(jax.random.key(16), (2, 6, TINY.model_dim))
    valid, is_prefix = row_layout(2, 6, prefix_len=2)
    forward16 = jitted_forward(m16)
    full16, _ = forward16(x, valid, is_prefix)
    assert full16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(full16, np.float32), jitted_hidden(m32)(x, valid, is_prefix), atol=0.1)
    cache = m16.init_cache(2, 8)
    assert cache.layers[0].k.dtype == jnp.bfloat16
    _, cache = forward16(x[:, :5], valid[:, :5], is_prefix[:, :5], cache)
    step, cache = forward16(x[:, 5:], valid[:, 5:], is_prefix[:, 5:], cache)
    np.testing.assert_allclose(np.asarray(step, np.float32), np.asarray(full16[:, 5:], np.float32), atol=0.1)
    assert m16.logits(full16).dtype == jnp.float32


# ------------------------------------------------------------------------------------------------
# Sizes, sharding metadata, dropout, remat, config validation
# ------------------------------------------------------------------------------------------------


def expected_param_count(cfg):
    per_layer = (cfg.model_dim * cfg.num_heads * cfg.head_dim * 2  # q and o
                 + 2 * cfg.model_dim * cfg.num_kv_heads * cfg.head_dim  # k and v
                 + 3 * cfg.model_dim * cfg.mlp_dim  # gate, up, down
                 + cfg.model_dim * (2 if cfg.block == "sequential" else 1))  # norms
    embed = cfg.vocab_size * cfg.model_dim * (1 if cfg.tie_embeddings else 2)
    return embed + cfg.num_layers * per_layer + cfg.model_dim


@pytest.mark.parametrize("name,target", [("350m", 350e6), ("1b", 1e9)])
def test_preset_parameter_counts(name, target):
    cfg = DECODER_PRESETS[name]
    assert cfg.vocab_size == 32768 and cfg.tie_embeddings
    abstract = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    count = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert count == expected_param_count(cfg)
    assert abs(count - target) <= 0.1 * target, count


def test_params_carry_logical_axis_names():
    model = Decoder(dataclasses.replace(TINY, qk_norm=True, tie_embeddings=False), rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    names = {jax.tree_util.keystr(path): var.get_metadata()["out_sharding"]
             for path, var in jax.tree_util.tree_leaves_with_path(
                 state, is_leaf=lambda v: isinstance(v, nnx.Variable))}
    allowed = {"vocab", "embed", "mlp", "heads", "kv_heads", "head_dim", "norm"}
    assert all(set(axes) <= allowed for axes in names.values()), names
    assert names["['embedder']['table']"] == ("vocab", "embed")
    assert names["['embedder']['output']"] == ("embed", "vocab")
    assert names["['layers'][0]['attn']['q']"] == ("embed", "heads", "head_dim")
    assert names["['layers'][1]['attn']['k']"] == ("embed", "kv_heads", "head_dim")
    assert names["['layers'][0]['attn']['o']"] == ("heads", "head_dim", "embed")
    assert names["['layers'][0]['mlp']['down']"] == ("mlp", "embed")
    assert names["['layers'][0]['attn']['q_norm']['scale']"] == ("norm",)
    rules = (("embed", "fsdp"), ("vocab", "model"), ("mlp", "model"), ("heads", "model"))
    with nn.logical_axis_rules(rules):
        specs = nnx.get_partition_spec(state).to_pure_dict()
    assert specs["embedder"]["table"] == P("model", "fsdp")
    assert specs["layers"][0]["mlp"]["gate"] == P("fsdp", "model")


def padded_spec(spec, rank):
    """A PartitionSpec as a tuple of `rank` entries (jax drops trailing Nones)."""
    return tuple(spec) + (None,) * (rank - len(spec))


def test_constrain_is_a_noop_without_mesh_or_rules():
    x = jnp.ones((4, 6))
    assert sharding.constrain(x, ("batch", "embed")) is x
    with nn.logical_axis_rules((("batch", "data"),)):
        assert sharding.constrain(x, ("batch", "embed")) is x  # rules but no mesh
    with pytest.raises(ValueError, match="rank"):
        sharding.constrain(x, ("batch",))


@pytest.mark.parametrize("axis_type", [jax.sharding.AxisType.Auto, jax.sharding.AxisType.Explicit])
def test_constrain_applies_rules_under_a_mesh(axis_type):
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis_type,) * 2)
    rules = (("batch", "data"), ("mlp", "model"), ("embed", ("fsdp", "model")), ("kv_heads", "model"))
    f = jax.jit(lambda a: sharding.constrain(a * 2.0, ("batch", "mlp")))
    g = jax.jit(lambda a: sharding.constrain(a * 2.0, ("embed", None)))  # 'fsdp' is not in the mesh
    h = jax.jit(lambda a: sharding.constrain(a * 2.0, ("batch", "kv_heads")))  # one kv head: not divisible
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        out = f(jnp.ones((4, 8)))
        out2 = g(jnp.ones((8, 4)))
        out3 = h(jnp.ones((4, 1)))
    assert padded_spec(out.sharding.spec, 2) == ("data", "model")
    assert padded_spec(out2.sharding.spec, 2) == ("model", None)
    assert padded_spec(out3.sharding.spec, 2) == ("data", None)
    np.testing.assert_array_equal(np.asarray(out), 2.0 * np.ones((4, 8)))


def test_decoder_under_mesh_and_rules_matches_unsharded():
    model = make_decoder(dataclasses.replace(TINY, num_kv_heads=1))
    tokens = jax.random.randint(jax.random.key(13), (4, 6), 0, TINY.vocab_size)
    valid, is_prefix = row_layout(4, 6, prefix_len=2)
    graphdef, state = nnx.split(model)

    @jax.jit
    def logits_fn(state, tokens):
        m = nnx.merge(graphdef, state)
        return m.logits(m(m.embed(tokens), valid, is_prefix, deterministic=True)[0])

    want = logits_fn(state, tokens)
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    rules = (("batch", "data"), ("vocab", "model"), ("mlp", "model"), ("heads", "model"), ("kv_heads", "model"))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        got = jax.jit(logits_fn.__wrapped__)(state, tokens)
    assert padded_spec(got.sharding.spec, 3) == ("data", None, "model")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_dropout_needs_rngs_and_is_off_when_deterministic():
    cfg = dataclasses.replace(TINY, dropout=0.5)
    model = make_decoder(cfg)
    reference = make_decoder(TINY)  # same seed, same parameters, no dropout
    x = jax.random.normal(jax.random.key(14), (1, 5, TINY.model_dim))
    valid, is_prefix = row_layout(1, 5, prefix_len=1)
    det = jitted_hidden(model)(x, valid, is_prefix)
    np.testing.assert_allclose(det, jitted_hidden(reference)(x, valid, is_prefix), rtol=1e-6)
    with pytest.raises(ValueError, match="rngs"):
        model(x, valid, is_prefix, deterministic=False)
    noisy = jitted_forward(model, deterministic=False)(x, valid, is_prefix, rngs=nnx.Rngs(dropout=0))[0]
    assert np.abs(np.asarray(noisy) - det).max() > 1e-3


def test_remat_gives_the_same_gradients():
    x = jax.random.normal(jax.random.key(15), (2, 5, TINY.model_dim))
    valid, is_prefix = row_layout(2, 5, prefix_len=2)

    def grads(cfg):
        model = make_decoder(cfg)
        loss = lambda m: jnp.sum(m(x, valid, is_prefix, deterministic=True)[0] ** 2)  # noqa: E731
        return nnx.state(nnx.jit(nnx.grad(loss))(model), nnx.Param).to_pure_dict()

    plain, remat = grads(TINY), grads(dataclasses.replace(TINY, remat_policy="full"))
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(remat)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("overrides,message", [
    (dict(num_heads=4, num_kv_heads=3), "num_kv_heads"),
    (dict(block="serial"), "block"),
    (dict(activation="relu"), "activation"),
    (dict(attention_pattern=("local",)), "sliding_window"),
    (dict(attention_pattern=("global", "windowed"), sliding_window=4), "attention_pattern"),
    (dict(rope_fraction=0.0), "rope_fraction"),
    (dict(final_logit_softcap=-1.0), "final_logit_softcap"),
])
def test_config_rejects_inconsistent_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(TINY, **overrides)
