"""transformers adapter: Qwen2-VL / Qwen2.5-VL parity with Dense, vision spans, decode fallback, exact removal."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

import pytest
import torch

import visattn
from visattn.adapters.transformers import vision_spans
from visattn.methods import Dense

import _tiny_models as tm


@dataclass
class Recorder(Dense):
    log: List = field(default_factory=list, compare=False, repr=False)

    def attend(self, q, k, v, geometry, *, scale=None, attn_mask=None):
        self.log.append((geometry, q.shape, k.shape, None if attn_mask is None else attn_mask.dtype))
        return super().attend(q, k, v, geometry, scale=scale, attn_mask=attn_mask)


@pytest.fixture(scope="module", params=["2.5", "2"])
def qwen(request):
    return tm.tiny_qwen2_vl(request.param)


def test_dense_parity_spans_and_restore(qwen):
    inputs = tm.qwen_inputs(video_thw=(2, 4, 6), image_thw=(1, 4, 4))
    sd = {k: v.clone() for k, v in qwen.state_dict().items()}
    impl = qwen.config.text_config._attn_implementation
    with torch.no_grad():
        ref = qwen(**inputs).logits
        rec = Recorder()
        with visattn.apply(qwen, rec) as h:
            assert h.layers == ["model.language_model.layers.0.self_attn", "model.language_model.layers.1.self_attn"]
            assert qwen.config.text_config._attn_implementation == "visattn_sdpa"
            assert qwen.config.vision_config._attn_implementation == "sdpa"  # vision tower untouched
            out = qwen(**inputs).logits
        after = qwen(**inputs).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert torch.equal(after, ref)
    assert qwen.config.text_config._attn_implementation == impl
    assert all(torch.equal(qwen.state_dict()[k], v) for k, v in sd.items())
    assert not qwen._forward_pre_hooks
    assert len(rec.log) == 2
    geo, qs, ks, mask_dtype = rec.log[0]
    # [5, <vs>, image 2x2 (4 tokens), <ve>, 7, <vs>, video t=2: 2x(2x3) (12 tokens), <ve>, 6, 7, 8]
    assert geo.spans == ((2, (2, 2)), (9, (2, 2, 3)))
    assert geo.grid == (2, 2) and geo.spatial_start == 2 and geo.seq_len == 25
    assert qs[1] == 4 and ks[1] == 2  # GQA: k/v keep their 2 heads
    assert mask_dtype == torch.bool  # the causal mask is explicit


def test_generate_decode_uses_fallback(qwen):
    inputs = tm.qwen_inputs(video_thw=(2, 4, 4))
    with torch.no_grad():
        ref = qwen.generate(**inputs, max_new_tokens=3, do_sample=False)
        rec = Recorder()
        with visattn.apply(qwen, rec):
            out = qwen.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert torch.equal(out, ref)
    assert len(rec.log) == 2 and all(qs[2] > 1 for _, qs, _, _ in rec.log)  # prefill only (2 layers)


def test_padding_mask_and_batch(qwen):
    inputs = tm.qwen_inputs(video_thw=(2, 4, 4))
    ids = inputs["input_ids"].repeat(2, 1)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding on the second row
    kw = dict(inputs, input_ids=ids, attention_mask=mask, mm_token_type_ids=inputs["mm_token_type_ids"].repeat(2, 1),
              pixel_values_videos=inputs["pixel_values_videos"].repeat(2, 1),
              video_grid_thw=inputs["video_grid_thw"].repeat(2, 1))
    with torch.no_grad():
        ref = qwen(**kw).logits
        with visattn.apply(qwen, "dense"):
            out = qwen(**kw).logits
    torch.testing.assert_close(out[:, 2:], ref[:, 2:], atol=1e-5, rtol=0)


def test_eager_model_parity():
    model = tm.tiny_qwen2_vl("2.5", attn_implementation="eager")
    inputs = tm.qwen_inputs(video_thw=(2, 4, 4))
    with torch.no_grad():
        ref = model(**inputs).logits
        with visattn.apply(model, "dense"):
            assert model.config.text_config._attn_implementation == "visattn_eager"
            out = model(**inputs).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert model.config.text_config._attn_implementation == "eager"


def test_vision_spans_rules():
    ids = torch.tensor([1, 100, 100, 100, 100, 2, 101, 101, 101, 101, 101, 101])
    spans = vision_spans(ids, 100, 101, [[1, 4, 4]], [[3, 2, 4]], merge=2)
    assert spans == ((1, (2, 2)), (6, (3, 1, 2)))
    assert vision_spans(ids, 100, 101, [[1, 4, 8]], [[3, 2, 4]], merge=2) == ()  # count mismatch: no guessing
    assert vision_spans(ids, 100, 101, None, None, merge=2) == ()


def test_errors(qwen):
    with pytest.raises(ValueError, match="selects no attention module"):
        visattn.apply(qwen, "dense", layers="cross")
    cfg = qwen.config.text_config
    before = cfg._attn_implementation
    cfg._attn_implementation = "flash_attention_2"
    try:
        with pytest.raises(ValueError, match="attn_implementation='flash_attention_2'.*'sdpa'"):
            visattn.apply(qwen, "dense")
    finally:
        cfg._attn_implementation = before
