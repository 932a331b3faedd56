"""AgentSD method (`visattn.methods.Agent`), `agent_attention` and the ToMe graph: fp64 references and identities."""
import math

import pytest
import torch
import torch.nn.functional as F

from visattn import TokenGeometry
from visattn.kernels.reference import masked_attention
from visattn.methods import Agent, agent_attention, get_method
from visattn.methods._tome import bipartite_graph, dst_positions

TOL = dict(rtol=1e-10, atol=1e-10)


def ref_agent(q, k, v, a, scale, agent_scale, residual, rv=None):
    """softmax(Q A^T s^agent_scale) softmax(A K^T s) V + residual * V, explicit fp64 matmuls."""
    hq = q.shape[1]
    k = k.repeat_interleave(hq // k.shape[1], 1)
    v = v.repeat_interleave(hq // v.shape[1], 1)
    p1 = torch.softmax(a @ k.transpose(-1, -2) * scale, -1)
    p2 = torch.softmax(q @ a.transpose(-1, -2) * scale ** agent_scale, -1)
    rv = v if rv is None else rv.repeat_interleave(hq // rv.shape[1], 1)
    return p2 @ (p1 @ v) + residual * rv


def rnd(*shape):
    return torch.randn(*shape, dtype=torch.float64)


@pytest.mark.parametrize("hk", [4, 2])
def test_agent_attention_matches_fp64_reference(hk):
    q, a = rnd(2, 4, 50, 16), rnd(2, 4, 7, 16)
    k, v = rnd(2, hk, 50, 16), rnd(2, hk, 50, 16)
    out = agent_attention(q, k, v, a, agent_scale=0.3, residual=0.075)
    torch.testing.assert_close(out, ref_agent(q, k, v, a, 16 ** -0.5, 0.3, 0.075), **TOL)
    out2 = agent_attention(q, k, v, a, scale=0.1, agent_scale=1.0, residual=0.0)
    torch.testing.assert_close(out2, ref_agent(q, k, v, a, 0.1, 1.0, 0.0), **TOL)


def test_agent_attention_is_invariant_to_agent_order():
    q, k, v, a = rnd(1, 2, 30, 8), rnd(1, 2, 30, 8), rnd(1, 2, 30, 8), rnd(1, 2, 6, 8)
    perm = torch.randperm(6)
    torch.testing.assert_close(agent_attention(q, k, v, a), agent_attention(q, k, v, a[:, :, perm]), **TOL)


def test_identity_agents_equal_queries_gives_dense_when_query_agent_softmax_is_identity():
    """Identity: with A = Q, stage one is exactly dense attention at every query, so O = P2 . O_dense + r V with
    P2 = softmax(Q Q^T s2). For orthogonal queries of norm c, P2 -> I (off-diagonal weight e^{-c^2 s2}) and
    O = O_dense + r V. (For general queries P2 is not the identity: AgentSD with n = N is not dense attention.)"""
    n, d = 16, 32
    basis = torch.linalg.qr(rnd(d, d))[0][:n]                       # orthonormal rows
    q = (30.0 * basis).expand(1, 1, n, d).clone()
    k, v = rnd(1, 1, n, d), rnd(1, 1, n, d)
    out = agent_attention(q, k, v, q, agent_scale=0.3, residual=0.075)
    dense = masked_attention(q, k, v)
    torch.testing.assert_close(out, dense + 0.075 * v, rtol=1e-9, atol=1e-9)
    # generic (small, correlated) queries: the identity does not hold (documented), the difference is large
    qg = 0.3 * rnd(1, 1, n, d) + 0.3 * rnd(1, 1, 1, d)
    assert (agent_attention(qg, k, v, qg, residual=0.0) - masked_attention(qg, k, v)).abs().max() > 1e-2


# ---------------------------------------------------------------- ToMe graph
def test_dst_positions_one_per_window():
    g = torch.Generator().manual_seed(1)
    pos = dst_positions((9, 10), (4, 3), generator=g)
    assert pos.numel() == (9 // 4) * (10 // 3)
    rows, cols = pos // 10, pos % 10
    cells = set(zip((rows // 4).tolist(), (cols // 3).tolist()))
    assert len(cells) == pos.numel() and max(rows) < 8 and max(cols) < 9
    assert dst_positions((4, 4), (2, 2), randomize=False).tolist() == [0, 2, 8, 10]


@pytest.mark.parametrize("r", [0, 5, 40, 48])
def test_tome_merge_is_group_mean_and_unmerge_copies_back(r):
    torch.manual_seed(0)
    b, hgt, wid = 3, 8, 8
    metric = rnd(b, hgt * wid, 12)
    gr = bipartite_graph(metric, (hgt, wid), (2, 2), generator=torch.Generator().manual_seed(3))
    x = rnd(b, 2, hgt * wid, 5)
    m = gr.merge(x, r)
    re = gr.clamp(r)
    assert m.shape == (b, 2, hgt * wid - re, 5) and re == min(r, 48)
    inv = gr._indices(r)[3]
    for bi in range(b):                        # reference: merged token j = mean of the originals mapped to j
        for j in range(m.shape[2]):
            members = (inv[bi] == j).nonzero().flatten()
            assert members.numel() >= 1
            torch.testing.assert_close(m[bi, :, j], x[bi, :, members].mean(1), **TOL)
    u = gr.unmerge(m, r)
    torch.testing.assert_close(u, m.gather(2, inv[:, None, :, None].expand(b, 2, hgt * wid, 5)), **TOL)
    if r == 0:
        torch.testing.assert_close(u, x, rtol=0, atol=0)


def test_tome_merges_the_most_similar_src_first_and_never_across_batch():
    metric = rnd(2, 16, 4)
    gr = bipartite_graph(metric, (4, 4), (2, 2), randomize=False)
    mn = metric / metric.norm(dim=-1, keepdim=True)
    sims = (mn[:, gr.src_pos] @ mn[:, gr.dst_pos].transpose(1, 2)).max(-1).values
    ranked = sims.gather(1, gr.rank)
    assert (ranked[:, :-1] >= ranked[:, 1:]).all()
    x = rnd(2, 16, 3)
    x2 = x.clone()
    x2[1] += 100.0
    torch.testing.assert_close(gr.merge(x, 6)[0], gr.merge(x2, 6)[0], rtol=0, atol=0)


# ---------------------------------------------------------------- the method
def geom(b=2, h=2, grid=(8, 8), step=0, extra=(0, 0), **kw):
    n = math.prod(grid) + sum(extra)
    return TokenGeometry(b, h, n, n, grid=grid, spatial_start=extra[0], step=step, num_steps=50,
                         layer="down_blocks.0.attentions.0.transformer_blocks.0.attn1", **kw)


def qkv(g, d=16):
    return rnd(g.batch, g.heads, g.seq_len, d), rnd(g.batch, g.heads, g.seq_len, d), rnd(g.batch, g.heads, g.seq_len, d)


def test_defaults_are_released_agentsd_and_registered():
    m = get_method("agent")
    assert isinstance(m, Agent)
    assert (m.agent_ratio, m.merge, m.steps, m.agent_scale, m.residual, m.merge_ratio, m.agent_stride,
            m.after_stride, m.layers, m.after) == (0.95, "tome", (0, 20), 0.3, 0.075, 0.4, (4, 4), (2, 2),
                                                    "full_resolution", "tome")
    assert get_method("agent", merge="pool").merge == "pool"


def test_released_agent_count_at_512px():
    """Worked numbers of docs/research for SD1.5 at 512 px (64x64 = 4096 tokens): 256 agents, 2458 merged tokens
    in steps 0-19 (agent attention); afterwards ToMe on 2458 tokens without agents."""
    m = Agent()
    g = geom(b=2, h=1, grid=(64, 64))
    q, k, v = (torch.randn(2, 1, 4096, 8) for _ in range(3))
    m(q, k, v, g)
    assert m.last_stats[g.layer] == {"mode": "agent", "tokens": 4096, "merged": 2458, "agents": 256}
    m(q, k, v, g.with_(step=20))
    assert m.last_stats[g.layer]["mode"] == "tome" and m.last_stats[g.layer]["merged"] == 2458


def test_pool_mode_fp64_reference():
    """merge='pool', no feature merging: agents = 4x4-window means of the queries, then the exact formula."""
    g = geom(grid=(8, 12))
    q, k, v = qkv(g)
    m = Agent(merge="pool", merge_ratio=0.0)
    out = m(q, k, v, g)
    a = torch.stack([q[:, :, [(4 * i + y) * 12 + 4 * j + x for y in range(4) for x in range(4)]].mean(2)
                     for i in range(2) for j in range(3)], dim=2)
    torch.testing.assert_close(out, ref_agent(q, k, v, a, 16 ** -0.5, 0.3, 0.075), **TOL)
    assert m.last_stats[g.layer]["agents"] == 6


def test_tome_mode_fp64_reference():
    """Full AgentSD path (ToMe merge of q/k/v, ToMe-merged agents, agent formula, unmerge) against the formula on
    explicitly merged tensors built from the graph's group membership."""
    g = geom(grid=(8, 8))
    q, k, v = qkv(g)
    m = Agent(agent_ratio=0.9, merge_ratio=0.3)
    out = m(q, k, v, g)
    gr = m.graph(q, k, g, m.agent_stride)                    # same seed -> same graph
    r, ra = gr.clamp(int(64 * 0.3)), gr.clamp(int(64 * 0.9))

    def merged(x, rr):
        inv = gr._indices(rr)[3]
        cnt = 64 - rr
        return torch.stack([torch.stack([x[b][:, inv[b] == j].mean(1) for j in range(cnt)], 1)
                            for b in range(x.shape[0])])
    qm, km, vm, a = merged(q, r), merged(k, r), merged(v, r), merged(q, ra)
    assert 2 * a.shape[2] < qm.shape[2]
    ref_m = ref_agent(qm, km, vm, a, 16 ** -0.5, 0.3, 0.075)
    inv = gr._indices(r)[3]
    ref = torch.stack([ref_m[b][:, inv[b]] for b in range(2)])
    torch.testing.assert_close(out, ref, **TOL)


def test_identity_merge_with_all_tokens_as_agents_is_exact_dense():
    """agent_ratio=0 and merge_ratio=0: identity merge, n = N agents. The released gate (agents only if 2n < N')
    then runs plain softmax attention: the output is exactly dense attention."""
    g = geom(grid=(6, 6))
    q, k, v = qkv(g)
    m = Agent(agent_ratio=0.0, merge_ratio=0.0)
    torch.testing.assert_close(m(q, k, v, g), masked_attention(q, k, v), **TOL)
    assert m.last_stats[g.layer] == {"mode": "dense", "tokens": 36, "merged": 36, "agents": 36}


def test_dense_paths_are_exact():
    g = geom(grid=(8, 8))
    q, k, v = qkv(g)
    ref = masked_attention(q, k, v)
    for m, gg in [(Agent(), g.with_(is_cross=True)),
                  (Agent(), g.with_(base_grid=(16, 16))),                 # not a full-resolution layer
                  (Agent(layers=["up_blocks.3"]), g),                      # layer not selected
                  (Agent(after="dense"), g.with_(step=25)),                # after the agent phase
                  (Agent(), g.with_(grid=None))]:
        torch.testing.assert_close(m(q, k, v, gg), ref, **TOL)
    assert Agent(layers=2).selects_layer(g.with_(base_grid=(16, 16)))
    assert Agent().selects_layer(g.with_(base_grid=(8, 8)))


def test_extra_tokens_stay_dense_and_grid_uses_all_keys():
    g = geom(grid=(8, 8), extra=(3, 5))
    q, k, v = qkv(g)
    m = Agent(merge="pool", merge_ratio=0.0)
    out = m(q, k, v, g)
    ref = masked_attention(q, k, v)
    ex = list(range(3)) + list(range(67, 72))
    torch.testing.assert_close(out[:, :, ex], ref[:, :, ex], **TOL)
    qs, vs = q[:, :, 3:67], v[:, :, 3:67]
    a = F.adaptive_avg_pool2d(qs.transpose(2, 3).reshape(2, 32, 8, 8), (2, 2)).reshape(2, 2, 16, 4).transpose(2, 3)
    torch.testing.assert_close(out[:, :, 3:67], ref_agent(qs, k, v, a, 0.25, 0.3, 0.075, rv=vs), **TOL)


def test_schedule_from_geometry():
    g = geom()
    m = Agent()
    assert m.in_agent_phase(g.with_(step=19)) and not m.in_agent_phase(g.with_(step=20))
    assert m.in_agent_phase(g.with_(step=None))
    f = Agent(steps=(0.0, 0.4))
    assert f.in_agent_phase(g.with_(step=9, num_steps=25)) and not f.in_agent_phase(g.with_(step=10, num_steps=25))
    with pytest.raises(ValueError, match="num_steps"):
        f.in_agent_phase(g.with_(step=3, num_steps=None))


def test_deterministic_and_seeded_by_geometry():
    g = geom(grid=(16, 16))
    q, k, v = qkv(g)
    m = Agent()
    o1, o2 = m(q, k, v, g), m(q, k, v, g)
    torch.testing.assert_close(o1, o2, rtol=0, atol=0)
    d0 = m.graph(q, k, g, (4, 4)).dst_pos
    d1 = m.graph(q, k, g.with_(step=1), (4, 4)).dst_pos
    assert not torch.equal(d0, d1)                                   # random dst differ between steps
    d_odd = m.graph(q[:1], k[:1], g.with_(batch=1), (4, 4)).dst_pos  # odd batch: top-left, as released
    assert torch.equal(d_odd, dst_positions((16, 16), (4, 4), randomize=False))


@pytest.mark.parametrize("bad, match", [
    (dict(agent_ratio=1.0), "agent_ratio"), (dict(merge="mean"), "merge"), (dict(steps=(5, 2)), "steps"),
    (dict(steps=(0.0, 1.5)), "steps"), (dict(agent_stride=0), "agent_stride"), (dict(after="none"), "after"),
    (dict(layers="some"), "layers"), (dict(metric="x"), "metric"), (dict(residual=float("nan")), "residual"),
    (dict(merge_ratio=-0.1), "merge_ratio")])
def test_bad_options_raise(bad, match):
    with pytest.raises(ValueError, match=match):
        Agent(**bad)


def test_attn_mask_and_3d_grid_errors():
    g = geom(grid=(4, 4))
    q, k, v = qkv(g)
    with pytest.raises(ValueError, match="attn_mask"):
        Agent()(q, k, v, g, attn_mask=torch.zeros(16, 16, dtype=torch.float64))
    g3 = geom(grid=(2, 2, 4))
    with pytest.raises(ValueError, match="2-D"):
        Agent()(q, k, v, g3)


# ---------------------------------------------------------------- the fast path (token-major, one index_add)
def test_merge_tokens_matches_per_tensor_merge_and_unmerge_is_one_gather():
    """merge_tokens merges several token-major tensors of different widths at once, exactly like merge() on each;
    unmerge_tokens is the inverse copy; r = 0 is the identity."""
    metric = rnd(2, 12 * 8, 6)
    gr = bipartite_graph(metric, (12, 8), (2, 2), generator=torch.Generator().manual_seed(0))
    a, b = rnd(2, 96, 10), rnd(2, 96, 4)
    for r in (0, 7, 24, 48):
        ma, mb = gr.merge_tokens([a, b], r)
        torch.testing.assert_close(ma, gr.merge(a, r), rtol=0, atol=0)
        torch.testing.assert_close(mb, gr.merge(b, r), rtol=0, atol=0)
        inv = gr._indices(r)[3]
        torch.testing.assert_close(gr.unmerge_tokens(ma, r), ma.gather(1, inv[:, :, None].expand(2, 96, 10)), **TOL)
    assert gr.merge_tokens([a], 0)[0] is a


def test_released_order_rank_and_slots():
    """slots(r): the r best-ranked src tokens land on their dst's slot, the others keep their rank order."""
    metric = rnd(3, 64, 5)
    gr = bipartite_graph(metric, (8, 8), (2, 2), generator=torch.Generator().manual_seed(2))
    r = 20
    inv = gr._indices(r)[3]
    n_unm = gr.num_src - r
    for bi in range(3):
        ranked_src = gr.src_pos[gr.rank[bi]]
        assert inv[bi, ranked_src[r:]].tolist() == list(range(n_unm))
        assert inv[bi, ranked_src[:r]].tolist() == (n_unm + gr.target[bi, gr.rank[bi, :r]]).tolist()
        assert inv[bi, gr.dst_pos].tolist() == list(range(n_unm, n_unm + gr.num_dst))


def test_processor_layout_gives_the_same_result_as_contiguous():
    """q/k/v as head-split views of (B, N, H*D) memory (the processors' layout) or contiguous (B, H, N, D)."""
    g = geom(grid=(8, 8))
    mem = [rnd(2, 64, 2 * 16) for _ in range(3)]
    views = [t.view(2, 64, 2, 16).transpose(1, 2) for t in mem]
    conts = [t.contiguous() for t in views]
    for m in (Agent(), Agent(steps=(0, 0)), Agent(merge="pool", merge_ratio=0.0)):
        torch.testing.assert_close(m(*views, g), m(*conts, g), **TOL)


def test_gate_is_decided_before_building_agents():
    """A mild agent setting fails the released gate: no agent tensor is built, ToMe softmax runs (stats say so)."""
    g = geom(grid=(8, 8))
    q, k, v = qkv(g)
    m = Agent(agent_ratio=0.1, merge_ratio=0.4)
    out = m(q, k, v, g)
    assert m.last_stats[g.layer] == {"mode": "tome", "tokens": 64, "merged": 64 - 25, "agents": 64 - 6}
    torch.testing.assert_close(out, Agent(steps=(0, 0), after_stride=(4, 4))(q, k, v, g), **TOL)


def test_backward_through_merge_and_agents():
    """The path stays differentiable (no out= kernels when autograd records): fp64 gradcheck on a small layer."""
    g = geom(b=2, h=1, grid=(4, 4))
    q, k, v = (t.requires_grad_() for t in (rnd(2, 1, 16, 4), rnd(2, 1, 16, 4), rnd(2, 1, 16, 4)))
    m = Agent(agent_ratio=0.9, merge_ratio=0.3, agent_stride=2)
    m(q, k, v, g)
    assert m.last_stats[g.layer]["mode"] == "agent"
    # the graph depends on k only through argmax/argsort (piecewise constant): check q and v, k fixed
    kd = k.detach()
    assert torch.autograd.gradcheck(lambda a, c: m(a, kd, c, g), (q, v), eps=1e-6, atol=1e-6)


def test_inference_mode_cache_is_usable_with_autograd():
    g = geom(grid=(8, 8), b=1)                                     # odd batch: cached (deterministic) partition
    q, k, v = qkv(g.with_(batch=1))
    m = Agent()
    with torch.inference_mode():
        m(q, k, v, g)
    assert len(m._cache) > 0
    qq = q.clone().requires_grad_()
    m(qq, k, v, g).sum().backward()
    assert qq.grad is not None and torch.isfinite(qq.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_triton_merge_matches_torch_merge(dtype):
    """The CUDA merge kernels (run here by the Triton interpreter) give the torch path's group means: unmerged rows
    bit-exact, dst groups to fp32 rounding (bf16: one ulp, the interpreter rounds ties differently)."""
    from visattn.methods import _agent_merge
    if _agent_merge.triton is None or not (torch.cuda.is_available() or _agent_merge.os_interpret()):
        pytest.skip("needs triton (GPU or TRITON_INTERPRET=1)")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    b, grid = 2, (8, 12)
    gr = bipartite_graph(torch.randn(b, 96, 8, device=dev), grid, (2, 2), generator=torch.Generator().manual_seed(0))
    xs = [torch.randn(b, 96, 24, device=dev).to(dtype), torch.randn(b, 96, 40, device=dev).to(dtype)[:, :, 8:24]]
    tol = dict(rtol=0, atol=1e-6) if dtype == torch.float32 else dict(rtol=2 ** -7, atol=2 ** -7)
    for r in (1, 17, gr.num_src):
        ref, out = gr.merge_tokens(xs, r, fused=False), gr.merge_tokens(xs, r, fused=True)
        n_unm = gr.num_src - r
        for a, c in zip(ref, out):
            torch.testing.assert_close(c[:, :n_unm], a[:, :n_unm], rtol=0, atol=0)
            torch.testing.assert_close(c, a, **tol)


def test_graph_runner_is_bounded():
    """More captured shapes than ``max_entries``: the oldest graph is dropped before a new one is captured."""
    from visattn.methods._agent_graph import GraphRunner, _Entry

    class _FakeGraph:
        def replay(self):
            pass

    runner = GraphRunner(max_entries=2)

    def fake_capture(key, fn, inputs, perm_host, keep):
        e = runner._entries[key] = _Entry(_FakeGraph(), [torch.zeros(1)], torch.zeros(1), torch.ones(1), [])
        runner.captures += 1
        return e

    runner._capture = fake_capture
    for key in ("a", "b", "c"):
        out = runner.run((key,), None, [torch.zeros(1)], torch.zeros(1))
        assert torch.equal(out, torch.ones(1))
    assert len(runner) == 2 and runner.captures == 3 and list(runner._entries) == [("b",), ("c",)]
