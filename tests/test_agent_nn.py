"""visattn.nn.AgentAttention (Agent-DeiT / Agent-PVT layouts) and visattn.convert.to_agent / from_agent."""
import math

import pytest
import torch
import torch.nn.functional as F

from visattn.convert import agent_modules, from_agent, to_agent
from visattn.nn import AgentAttention

from _tiny_models import tiny_vit


def official_deit_keys(c, h, n, w):
    """Parameter names and shapes of the official Agent-DeiT ``AgentAttention`` (agent_deit.py)."""
    return {"qkv.weight": (3 * c, c), "qkv.bias": (3 * c,), "proj.weight": (c, c), "proj.bias": (c,),
            "dwc.weight": (c, 1, 3, 3), "dwc.bias": (c,), "an_bias": (h, n, 7, 7), "na_bias": (h, n, 7, 7),
            "ah_bias": (1, h, n, w, 1), "aw_bias": (1, h, n, 1, w), "ha_bias": (1, h, w, 1, n),
            "wa_bias": (1, h, 1, w, n), "ac_bias": (1, h, n, 1), "ca_bias": (1, h, 1, n)}


def official_pvt_keys(c, h, n, w, sr):
    """Parameter names and shapes of the official Agent-PVT ``AgentAttention`` (agent_pvt.py)."""
    d = {"q.weight": (c, c), "q.bias": (c,), "kv.weight": (2 * c, c), "kv.bias": (2 * c,), "proj.weight": (c, c),
         "proj.bias": (c,), "dwc.weight": (c, 1, 3, 3), "dwc.bias": (c,), "an_bias": (h, n, 7, 7),
         "na_bias": (h, n, 7, 7), "ah_bias": (1, h, n, w // sr, 1), "aw_bias": (1, h, n, 1, w // sr),
         "ha_bias": (1, h, w, 1, n), "wa_bias": (1, h, 1, w, n)}
    if sr > 1:
        d.update({"sr.weight": (c, c, sr, sr), "sr.bias": (c,), "norm.weight": (c,), "norm.bias": (c,)})
    return d


def random_state(keys, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: 0.3 * torch.randn(s, generator=g, dtype=torch.float64) for k, s in keys.items()}


def ref_forward(sd, x, heads, n_agents, grid, prefix, sr=1):
    """The agent-attention formula written out per head with explicit loops for every bias entry (fp64)."""
    b, ntok, c = x.shape
    d = c // heads
    hh, ww = grid
    if "qkv.weight" in sd:
        q, k, v = (x @ sd["qkv.weight"].T + sd["qkv.bias"]).split(c, dim=-1)
        kh, kw = hh, ww
    else:
        q = x @ sd["q.weight"].T + sd["q.bias"]
        src = x
        kh, kw = hh // sr, ww // sr
        if sr > 1:
            img = x.transpose(1, 2).reshape(b, c, hh, ww)
            src = F.conv2d(img, sd["sr.weight"], sd["sr.bias"], stride=sr).flatten(2).transpose(1, 2)
            src = F.layer_norm(src, (c,), sd["norm.weight"], sd["norm.bias"])
        k, v = (src @ sd["kv.weight"].T + sd["kv.bias"]).split(c, dim=-1)
    pool = int(math.isqrt(n_agents))
    qg = q[:, prefix:].reshape(b, hh, ww, c)
    agents = []
    for i in range(pool):                      # adaptive average pooling bins
        for j in range(pool):
            r0, r1 = (i * hh) // pool, -((-(i + 1) * hh) // pool)
            c0, c1 = (j * ww) // pool, -((-(j + 1) * ww) // pool)
            agents.append(qg[:, r0:r1, c0:c1].mean((1, 2)))
    a = torch.stack(agents, 1)                                          # (b, n, c)
    an = F.interpolate(sd["an_bias"], size=(kh, kw), mode="bilinear", align_corners=False)
    na = F.interpolate(sd["na_bias"], size=(hh, ww), mode="bilinear", align_corners=False)
    nk, nq = prefix + kh * kw, prefix + hh * ww
    out = torch.zeros(b, ntok, c, dtype=x.dtype)
    for h in range(heads):
        b1 = torch.zeros(n_agents, nk, dtype=x.dtype)
        b2 = torch.zeros(nq, n_agents, dtype=x.dtype)
        for ag in range(n_agents):
            for p in range(prefix):
                b1[ag, p] = sd["ac_bias"][0, h, ag, p]
                b2[p, ag] = sd["ca_bias"][0, h, p, ag]
            for y in range(kh):
                for xx in range(kw):
                    b1[ag, prefix + y * kw + xx] = an[h, ag, y, xx] + sd["ah_bias"][0, h, ag, y, 0] + \
                        sd["aw_bias"][0, h, ag, 0, xx]
            for y in range(hh):
                for xx in range(ww):
                    b2[prefix + y * ww + xx, ag] = na[h, ag, y, xx] + sd["ha_bias"][0, h, y, 0, ag] + \
                        sd["wa_bias"][0, h, 0, xx, ag]
        sl = slice(h * d, (h + 1) * d)
        p1 = torch.softmax(a[..., sl] @ k[..., sl].transpose(1, 2) * d ** -0.5 + b1, -1)
        p2 = torch.softmax(q[..., sl] @ a[..., sl].transpose(1, 2) * d ** -0.5 + b2, -1)
        out[..., sl] = p2 @ (p1 @ v[..., sl])
    vimg = v[:, prefix:].transpose(1, 2).reshape(b, c, kh, kw)
    if (kh, kw) != (hh, ww):
        vimg = F.interpolate(vimg, size=(hh, ww), mode="bilinear", align_corners=False)
    conv = F.conv2d(vimg, sd["dwc.weight"], sd["dwc.bias"], padding=1, groups=c).flatten(2).transpose(1, 2)
    out[:, prefix:] += conv
    return out @ sd["proj.weight"].T + sd["proj.bias"]


def test_deit_layout_strict_load_and_fp64_reference():
    c, h, n, w = 24, 3, 9, 6
    m = AgentAttention(c, h, qkv_bias=True, agent_num=n, window=w).double()
    sd = random_state(official_deit_keys(c, h, n, w))
    m.load_state_dict(sd, strict=True)
    x = torch.randn(2, 1 + w * w, c, dtype=torch.float64)
    torch.testing.assert_close(m(x), ref_forward(sd, x, h, n, (w, w), 1), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("sr", [1, 2])
def test_pvt_layout_strict_load_and_fp64_reference(sr):
    c, h, n, w = 16, 2, 4, 8
    m = AgentAttention(c, h, qkv_bias=True, agent_num=n, window=w, num_prefix_tokens=0, sr_ratio=sr,
                       fused_qkv=False).double()
    sd = random_state(official_pvt_keys(c, h, n, w, sr), seed=sr)
    m.load_state_dict(sd, strict=True)
    x = torch.randn(2, w * w, c, dtype=torch.float64)
    torch.testing.assert_close(m(x, w, w), ref_forward(sd, x, h, n, (w, w), 0, sr), rtol=1e-10, atol=1e-10)


def test_agent_deit_tiny_shapes_load_strict():
    """Official Agent-DeiT-T attention: dim 192, 3 heads, 49 agents, window 14."""
    m = AgentAttention(192, 3, qkv_bias=True, agent_num=49, window=14)
    m.load_state_dict({k: torch.zeros(s) for k, s in official_deit_keys(192, 3, 49, 14).items()}, strict=True)
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == official_deit_keys(192, 3, 49, 14)


def test_other_grid_resizes_biases_and_non_square_grid():
    m = AgentAttention(16, 2, agent_num=4, window=4).double()
    x = torch.randn(1, 1 + 6 * 8, 16, dtype=torch.float64)
    y = m(x, 6, 8)
    assert y.shape == x.shape and torch.isfinite(y).all()
    with pytest.raises(ValueError, match="H and W"):
        m(torch.randn(1, 1 + 6 * 8, 16, dtype=torch.float64))


def test_identity_n_agents_equal_tokens_with_local_bias_is_dense():
    """Identity: agent_num = N with pooling = identity (agents = queries), zero DWC and a query->agent bias of
    +c on the query's own agent per axis make softmax(Q A^T s + B2) -> I, so every grid query gets exactly the
    dense attention output (error ~ e^{-c}). The class token reads the agents, so it is not covered."""
    vit = tiny_vit(img_size=(32, 32), patch_size=8).double()
    dense_attn = vit.blocks[0].attn
    x = torch.randn(2, 17, vit.embed_dim, dtype=torch.float64)
    ref = dense_attn(x)
    to_agent(vit, num_agents=16, init="local", local_strength=60.0)
    out = vit.blocks[0].attn(x)
    torch.testing.assert_close(out[:, 1:], ref[:, 1:], rtol=1e-9, atol=1e-9)
    to_agent(vit2 := tiny_vit(img_size=(32, 32), patch_size=8).double(), num_agents=16, init="zero")
    assert (vit2.blocks[0].attn(x)[:, 1:] - ref[:, 1:]).abs().max() > 1e-4     # no locality prior: not dense


def test_to_agent_keeps_keys_and_from_agent_round_trip():
    vit = tiny_vit(img_size=(32, 48))
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        ref = vit(x)
    sd0 = {k: v.clone() for k, v in vit.state_dict().items()}
    to_agent(vit, num_agents=4)
    assert len(agent_modules(vit)) == 2
    sd1 = vit.state_dict()
    assert set(sd0) <= set(sd1)
    assert all(torch.equal(sd0[k], sd1[k]) for k in sd0)
    new = set(sd1) - set(sd0)
    assert new == {f"blocks.{i}.attn.{n}" for i in range(2) for n in
                   ("dwc.weight", "dwc.bias", "an_bias", "na_bias", "ah_bias", "aw_bias", "ha_bias", "wa_bias",
                    "ac_bias", "ca_bias")}
    assert vit.blocks[0].attn.window == (2, 3) and vit.blocks[0].attn.num_prefix_tokens == 1
    with torch.no_grad():
        conv = vit(x)
    assert not torch.equal(conv, ref)
    from_agent(vit)
    assert set(vit.state_dict()) == set(sd0)
    with torch.no_grad():
        torch.testing.assert_close(vit(x), ref, rtol=0, atol=0)


def test_converted_state_dict_round_trip_strict():
    a = to_agent(tiny_vit(img_size=(32, 32), seed=1), num_agents=4, init="official")
    b = to_agent(tiny_vit(img_size=(32, 32), seed=2), num_agents=4)
    b.load_state_dict(a.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)


def test_converted_model_starts_close_and_trains():
    """Layer-level closeness on smooth token maps (what patch embeddings of images look like), and gradients reach
    every new parameter."""
    torch.manual_seed(0)
    vit = tiny_vit(img_size=(64, 64), patch_size=8)
    attn = vit.blocks[0].attn
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 8), torch.linspace(0, 1, 8), indexing="ij")
    basis = torch.stack([torch.sin(3 * yy + f) * torch.cos(2 * xx - f) for f in torch.linspace(0, 3, 6)], -1)
    grid_tok = basis.reshape(64, 6) @ torch.randn(6, vit.embed_dim)
    x = torch.cat([torch.randn(1, vit.embed_dim), grid_tok])[None].repeat(2, 1, 1)
    with torch.no_grad():
        ref = attn(x)
    errs = {}
    for init in ("local", "zero", "official"):
        m = to_agent(tiny_vit(img_size=(64, 64), patch_size=8), num_agents=16, init=init).blocks[0].attn
        with torch.no_grad():
            errs[init] = ((m(x) - ref).norm() / ref.norm()).item()
    assert errs["local"] < 0.25 and errs["local"] < errs["official"], errs
    m = to_agent(tiny_vit(img_size=(64, 64), patch_size=8), num_agents=16)
    m.train()
    m(torch.randn(2, 3, 64, 64)).logsumexp(-1).sum().backward()
    for name, p in m.blocks[0].attn.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_conversion_errors():
    with pytest.raises(ValueError, match="num_agents"):
        to_agent(tiny_vit(), num_agents=10)
    with pytest.raises(ValueError, match="init"):
        to_agent(tiny_vit(), init="random")
    with pytest.raises(ValueError, match="blocks"):
        to_agent(tiny_vit(), blocks=[7])
    with pytest.raises(ValueError, match="q_norm"):
        to_agent(tiny_vit(qk_norm=True), num_agents=4)
    with pytest.raises(ValueError, match="blocks"):
        to_agent(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="agent_num"):
        AgentAttention(16, 2, agent_num=8)
    with pytest.raises(ValueError, match="attn_mask"):
        AgentAttention(16, 2, agent_num=4, window=2)(torch.randn(1, 5, 16), attn_mask=torch.zeros(5, 5))
