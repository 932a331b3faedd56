"""AgentSD on tiny random-weight models through visattn.apply: closeness to dense, schedule, text stays dense."""
import torch
import torch.nn.functional as F

import visattn
from visattn.methods import Agent

from _tiny_models import (pipeline_kwargs, sd3_inputs, sdxl_unet_inputs, tiny_sd3, tiny_sd_pipeline, tiny_sdxl_unet,
                           tiny_unet, tiny_vit, unet_inputs)


def _latents_per_step(pipe, steps):
    lat = []

    def cb(p, i, t, kw):
        lat.append(kw["latents"].detach().clone())
        return kw

    kw = pipeline_kwargs(steps=steps, height=32, width=48)
    with torch.no_grad():
        pipe(**kw, callback_on_step_end=cb, callback_on_step_end_tensor_inputs=["latents"])
    return lat


def agentsd_step_cosines(steps: int = 10, method: Agent = None):
    """Cosine similarity per step between the latents of a dense and an AgentSD run of the tiny SD pipeline."""
    pipe = tiny_sd_pipeline()
    dense = _latents_per_step(pipe, steps)
    method = method or Agent(steps=(0.0, 0.4))
    with visattn.apply(pipe, method):
        agent = _latents_per_step(pipe, steps)
    return [F.cosine_similarity(a.flatten(), d.flatten(), dim=0).item() for a, d in zip(agent, dense)], method


def test_agentsd_close_to_dense_on_tiny_sd_pipeline():
    cos, m = agentsd_step_cosines(10)
    assert len(cos) == 10
    assert min(cos) > 0.98, cos                       # measured ~0.999 (see docs/methods/agent.md)
    modes = {k: v["mode"] for k, v in m.last_stats.items()}
    # after the run (last step is in the ToMe phase): full-res attn1 -> tome, others dense
    full = [k for k in modes if k.startswith(("down_blocks.0", "up_blocks.1")) and k.endswith("attn1")]
    assert full and all(modes[k] == "tome" for k in full), modes


def test_agent_phase_uses_agents_at_full_resolution_only():
    unet = tiny_unet()
    m = Agent()
    with visattn.apply(unet, m), torch.no_grad():
        out = unet(**unet_inputs((16, 24))).sample
    stats = m.last_stats
    assert stats, "no attention call reached the method"
    for name, s in stats.items():
        if s["tokens"] == 16 * 24 and s["mode"] != "dense":
            assert s["mode"] == "agent" and s["agents"] == 24 and s["merged"] == 384 - int(384 * 0.4), s
    with torch.no_grad():
        ref = unet(**unet_inputs((16, 24))).sample
    assert F.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.98


def test_sdxl_unet_and_remove_restores():
    unet = tiny_sdxl_unet()
    inp = sdxl_unet_inputs((16, 24))
    with torch.no_grad():
        ref = unet(**inp).sample
        h = visattn.apply(unet, Agent(layers="all"))
        out = unet(**inp).sample
        h.remove()
        back = unet(**inp).sample
    assert F.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.98
    assert not torch.equal(out, ref)
    torch.testing.assert_close(back, ref, rtol=0, atol=0)


def test_sd3_joint_attention_text_tokens_stay_dense():
    model = tiny_sd3()
    inp = sd3_inputs((16, 24))
    m = Agent(layers="all", merge="pool", merge_ratio=0.0, agent_stride=2)
    with torch.no_grad():
        ref = model(**inp).sample
        with visattn.apply(model, m):
            out = model(**inp).sample
    assert any(s["mode"] == "agent" for s in m.last_stats.values()), m.last_stats
    assert F.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.95


def test_timm_vit_class_token_stays_dense():
    model = tiny_vit(img_size=(64, 64), patch_size=8)
    x = torch.randn(2, 3, 64, 64)
    m = Agent(merge="pool", merge_ratio=0.0, agent_stride=2)
    with torch.no_grad():
        ref = model(x)
        with visattn.apply(model, m):
            out = model(x)
    assert all(s["mode"] == "agent" and s["agents"] == 16 for s in m.last_stats.values()), m.last_stats
    assert F.cosine_similarity(out.flatten(1), ref.flatten(1), dim=1).min() > 0.95
