"""Every routed-expert path of ``moe.routed_experts`` computes the same thing as a per-token
loop in numpy: the per-row gather and the per-row ``lax.switch`` (no more (token, choice) rows
than experts: small-batch decode), every expert on every token (more rows, on CPU; experts
stacked or held split), and the grouped ``ragged_dot`` (the GPU / expert-parallel path). And
the runner on CPU holds its experts split, so a decode row reads its expert in place."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsv4_jax import init_params, preset
from dsv4_jax.engine.runner.layout import RunnerLayout
from dsv4_jax.model import moe
from dsv4_jax.model.params import to_native
from dsv4_jax.model.transformer import as_model

CFG = preset("tiny")  # 8 experts, top-2


def _experts(seed=1) -> moe.Experts:
    return as_model(init_params(CFG, jax.random.PRNGKey(seed)), CFG).layers[3].ffn.experts


def _split(experts: moe.Experts) -> moe.Experts:
    """The same experts held one array per expert (``moe.split_experts`` on their params)."""
    graph, state = nnx.split(experts)
    return nnx.merge(graph, moe.split_experts(nnx.State({"experts": state}))["experts"])


def _inputs(n, seed, repeat=False):
    rng = np.random.RandomState(seed)
    x = jnp.asarray(rng.standard_normal((n, CFG.hidden_size)), jnp.float32)
    e, k = CFG.n_routed_experts, CFG.num_experts_per_tok
    idx = np.stack([rng.permutation(e)[:k] for _ in range(n)])
    if repeat:  # a hash table may name one expert twice for a token
        idx[0, 1] = idx[0, 0]
    w = rng.uniform(0.2, 1.5, (n, k)).astype(np.float32)
    return x, jnp.asarray(idx, jnp.int32), jnp.asarray(w)


def _reference(x, idx, w, experts):
    """Σ_choices w · (swiglu(x W1ᵀ, x W3ᵀ) W2ᵀ), token by token, in float64."""
    w1, w3, w2 = (np.asarray(getattr(experts, n).weight[...], np.float64) for n in ("w1", "w3", "w2"))
    x, idx, w = np.asarray(x, np.float64), np.asarray(idx), np.asarray(w, np.float64)
    lim = CFG.swiglu_limit
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        for c in range(idx.shape[1]):
            e = idx[t, c]
            g = np.minimum(w1[e] @ x[t], lim)
            u = np.clip(w3[e] @ x[t], -lim, lim)
            out[t] += w2[e] @ (g / (1 + np.exp(-g)) * u * w[t, c])
    return out


@pytest.mark.parametrize("held", ["stacked", "split"])
@pytest.mark.parametrize("n", [1, 3, 4, 16])  # n·k <= 8 rows: per row; 16·2 > 8: every expert
def test_every_path_equals_the_per_token_loop(held, n):
    experts = _experts()
    x, idx, w = _inputs(n, seed=n, repeat=n == 16)
    mine = experts if held == "stacked" else _split(experts)
    got = moe.routed_experts(x, idx, w, mine, CFG)
    np.testing.assert_allclose(np.asarray(got), _reference(x, idx, w, experts), rtol=2e-5, atol=2e-5)


def test_grouped_ragged_path_equals_the_per_token_loop():
    experts = _experts()
    x, idx, w = _inputs(16, seed=5)
    # num_experts = E is the expert-parallel form with every expert local: the ragged_dot path.
    got = moe.routed_experts(x, idx, w, experts, CFG, num_experts=CFG.n_routed_experts)
    np.testing.assert_allclose(np.asarray(got), _reference(x, idx, w, experts), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("held", ["stacked", "split"])
def test_paths_agree_under_the_qat_rounding(held):
    experts = _experts()
    mine = experts if held == "stacked" else _split(experts)
    x, idx, w = _inputs(16, seed=7)
    full = moe.routed_experts(x, idx, w, mine, CFG, sim_quant=True)  # every expert on every token
    few = moe.routed_experts(x[:2], idx[:2], w[:2], mine, CFG, sim_quant=True)  # per row
    ragged = moe.routed_experts(x, idx, w, experts, CFG, sim_quant=True, num_experts=CFG.n_routed_experts)
    np.testing.assert_allclose(np.asarray(full), np.asarray(ragged), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(few), np.asarray(ragged[:2]), rtol=1e-5, atol=1e-5)


def test_split_experts_holds_each_expert_as_its_own_array_gate_and_up_stacked():
    params = init_params(CFG, jax.random.PRNGKey(2))
    split = moe.split_experts(params)
    before, after = to_native(params), to_native(split)
    for stacked, mine in zip(before["layers"] + before["mtp"], after["layers"] + after["mtp"]):
        routed, held = stacked["ffn"]["experts"], mine["ffn"]["experts"]
        w13, w2 = held["w1"]["weight"], held["w2"]["weight"]
        assert held["w3"]["weight"] == ()
        assert (
            isinstance(w13, tuple) and isinstance(w2, tuple) and len(w13) == len(w2) == CFG.n_routed_experts
        )
        both = np.concatenate(
            [np.asarray(routed["w1"]["weight"]), np.asarray(routed["w3"]["weight"])], axis=1
        )
        np.testing.assert_array_equal(np.stack([np.asarray(p) for p in w13]), both)  # [E, 2F, D]
        np.testing.assert_array_equal(
            np.stack([np.asarray(p) for p in w2]), np.asarray(routed["w2"]["weight"])
        )
        shared, held = stacked["ffn"]["shared_experts"], mine["ffn"]["shared_experts"]
        assert held["w3"]["weight"] == ()
        np.testing.assert_array_equal(
            np.asarray(held["w1"]["weight"]),
            np.concatenate([np.asarray(shared["w1"]["weight"]), np.asarray(shared["w3"]["weight"])]),
        )
        assert held["w2"]["weight"] is shared["w2"]["weight"]
    assert jax.tree.structure(moe.split_experts(split)) == jax.tree.structure(split)  # split stays split


def test_shared_expert_with_gate_and_up_stacked_equals_apart():
    model = as_model(init_params(CFG, jax.random.PRNGKey(6)), CFG)
    p = model.layers[3].ffn.shared_experts
    graph, state = nnx.split(p)
    held = nnx.merge(graph, moe.split_experts(nnx.State({"shared_experts": state}))["shared_experts"])
    x = jnp.asarray(np.random.RandomState(1).standard_normal((5, CFG.hidden_size)), jnp.float32)
    for sq in (False, True):
        np.testing.assert_allclose(
            np.asarray(moe.shared_expert(x, held, CFG, sim_quant=sq)),
            np.asarray(moe.shared_expert(x, p, CFG, sim_quant=sq)),
            rtol=1e-5,
            atol=1e-5,
        )


def test_split_decode_rows_read_experts_in_place():
    """The per-row path over split experts is a switch with no gather of weights; over a stack
    it gathers (the copy the split layout exists to avoid)."""
    experts = _experts()
    x, idx, w = _inputs(1, seed=3)
    split = _split(experts)
    jaxpr = str(jax.make_jaxpr(lambda e: moe.routed_experts(x, idx, w, e, CFG))(split))
    assert "cond[" in jaxpr and "gather[" not in jaxpr.split("cond[")[1]
    assert "gather[" in str(jax.make_jaxpr(lambda e: moe.routed_experts(x, idx, w, e, CFG))(experts))


def test_runner_holds_experts_split_on_cpu_without_a_mesh():
    assert jax.default_backend() == "cpu"
    params = init_params(CFG, jax.random.PRNGKey(4))
    placed = RunnerLayout.__new__(RunnerLayout)
    placed.layout = None
    held = placed.place_params(params)
    assert all(moe.is_split(blk.ffn.experts) for blk in as_model(held, CFG).layers)
