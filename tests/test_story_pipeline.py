"""StoryPipeline: prompt protocol, errors, end-to-end on a tiny offline pipeline, bank reuse, save/load."""
import warnings

import numpy as np
import pytest
import torch

from visattn.methods import IdentityBank
from visattn.pipelines import StoryPipeline, comic_strip
from visattn.pipelines.story import parse_story

from _story_tiny import tiny_sd_pipeline

RUN = dict(seed=3, num_inference_steps=2, height=32, width=48, guidance_scale=3.0)


def _px(im):
    return torch.from_numpy(np.asarray(im, dtype=np.float32))


@pytest.fixture(scope="module")
def pipe():
    warnings.filterwarnings("ignore", category=FutureWarning)
    return tiny_sd_pipeline()


def test_parse_story_protocol():
    desc, prompts, caps, who = parse_story("[Bob] a man in a red hat\n[Ann] a woman, green coat",
                                           ["[Bob] at the beach #Day one", "[Ann] and [Bob] dance", "[NC] a street"])
    assert desc == {"Bob": "a man in a red hat", "Ann": "a woman, green coat"}
    assert prompts == ["a man in a red hat at the beach", "a woman, green coat and a man in a red hat dance",
                       "a street"]
    assert caps == ["Day one", "and dance", "a street"]
    assert who == [["Bob"], ["Ann", "Bob"], []]
    _, prompts, _, who = parse_story(["[Bob] a man"], ["on a bus"])  # single character: untagged panel is his
    assert prompts == ["a man, on a bus"] and who == [["Bob"]]


@pytest.mark.parametrize("chars,panels,msg", [
    ("[Bob] a man", ["[Bo] at home"], r"unknown character \[Bo\]; known characters: \[Bob\]"),
    ("[Bob] a man", ["[NC] [Bob] at home"], r"\[NC\] and a character tag"),
    ("[Bob] a man\n[Ann] a woman", ["at home"], "no character tag"),
    ("Bob a man", ["[Bob] x"], "must start with a tag"),
    ("[NC] a man", ["x"], "reserved"),
    ("[Bob] a man", [], "non-empty list"),
])
def test_parse_errors(chars, panels, msg):
    with pytest.raises(ValueError, match=msg):
        parse_story(chars, panels)


def test_argument_errors(pipe):
    with pytest.raises(ValueError, match=r"sample_rate must be a number in \[0, 1\]"):
        StoryPipeline(pipe, sample_rate=1.5)
    story = StoryPipeline(pipe)
    with pytest.raises(ValueError, match=r"id_images=3 is more than the number of panels \(2\)"):
        story("[Bob] a man", ["[Bob] a", "[Bob] b"], id_images=3, **RUN)
    with pytest.raises(ValueError, match=r"character \[Bob\] needs 2 identity panel"):
        story("[Bob] a man\n[Ann] a woman", ["[Bob] a", "[Ann] b", "[Bob] and [Ann]"], id_images=2, **RUN)
    with pytest.raises(ValueError, match="mode must be"):
        StoryPipeline(pipe, mode="tiles")


def test_story_end_to_end_and_bank_reuse(pipe, tmp_path):
    before = {k: type(v) for k, v in pipe.unet.attn_processors.items()}
    story = StoryPipeline(pipe, sample_rate=0.5, gate=(1.0, 1.0))
    panels = ["[Bob] at the beach #Day one", "[Bob] in a cafe", "[NC] an empty street"]
    out = story("[Bob] a man in a red hat", panels, **RUN)
    assert len(out.panels) == 3 and all(p.size == (48, 32) for p in out.panels)
    assert out.identity_panels == {"Bob": [0]} and out.captions[0] == "Day one"
    assert out.strip.size[0] == 3 * 48 + 4 * 8 and out.strip.size[1] > 32 + 16  # captions row below
    bank = out.banks["Bob"]
    assert len(bank) > 0 and all(key[0] >= 1 for key in bank.keys())  # step 0 plain: not stored
    assert {key[1] for key in bank.keys()} == {0, 1}  # uncond and cond halves
    assert all(key[2].startswith("up_blocks") for key in bank.keys())  # layers="up"
    assert {k: type(v) for k, v in pipe.unet.attn_processors.items()} == before  # removed after the call
    # the saved bank replaces the identity run: same panel 1, identity panel not regenerated
    bank.save(tmp_path / "bob.safetensors")
    loaded = IdentityBank.load(tmp_path / "bob.safetensors")
    again = story("[Bob] a man in a red hat", panels[1:], banks={"Bob": loaded}, **RUN)
    assert again.identity_panels == {}
    a, b = (_px(im) for im in (out.panels[1], again.panels[0]))
    assert (a - b).abs().max() <= 1.0  # fp16-free CPU run: identical up to uint8 rounding
    # the [NC] panel equals the untouched pipeline with the same seed
    g = torch.Generator().manual_seed(RUN["seed"])
    plain = pipe("an empty street", generator=[g], num_inference_steps=2, height=32, width=48,
                 guidance_scale=3.0).images[0]
    assert (_px(plain) - _px(out.panels[2])).abs().max() <= 1.0


def test_batch_mode(pipe):
    story = StoryPipeline(pipe, mode="batch", sample_rate=1.0, gate=(1.0, 1.0))
    out = story("[Bob] a man", ["[Bob] a", "[Bob] b", "[Bob] c"], **RUN)
    assert len(out.panels) == 3 and out.banks == {} and story.method.stats["csa_calls"] > 0


def test_save_and_from_pretrained(pipe, tmp_path):
    story = StoryPipeline(pipe, sample_rate=0.3, gate=(0.5, 0.8), layers=("up_blocks.1",), mode="batch",
                          max_bank_bytes=123)
    story.save_pretrained(tmp_path / "story")
    back = StoryPipeline.from_pretrained(tmp_path / "story")
    assert back.method.sample_rate == 0.3 and back.method.gate == (0.5, 0.8)
    assert list(back.method.layers) == ["up_blocks.1"] and back.mode == "batch" and back.max_bank_bytes == 123
    assert type(back.pipe).__name__ == "StableDiffusionPipeline"
    override = StoryPipeline.from_pretrained(tmp_path / "story", sample_rate=0.9)
    assert override.method.sample_rate == 0.9
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        StoryPipeline.from_pretrained(tmp_path)


def test_comic_strip_layout():
    from PIL import Image

    ims = [Image.new("RGB", (20, 10), c) for c in ("red", "green", "blue", "white", "black")]
    s = comic_strip(ims, columns=2, padding=2)
    assert s.size == (2 * 20 + 3 * 2, 3 * 10 + 4 * 2)
    s2 = comic_strip(ims, ["one", "two", "three", "four", "five"], columns=2, padding=2)
    assert s2.size[0] == s.size[0] and s2.size[1] > s.size[1]
    assert s.getpixel((2, 2)) == (255, 0, 0) and s.getpixel((2 + 20 + 2, 2)) == (0, 128, 0)
    with pytest.raises(ValueError, match="columns"):
        comic_strip(ims, columns=0)


def test_multi_eval_scheduler_bank_mode():
    from diffusers import HeunDiscreteScheduler

    pipe = tiny_sd_pipeline()
    pipe.scheduler = HeunDiscreteScheduler.from_config(pipe.scheduler.config)
    story = StoryPipeline(pipe, gate=(1.0, 1.0))
    out = story("[Bob] a man", ["[Bob] a", "[Bob] b"], seed=0, num_inference_steps=2, height=32, width=32)
    bank = out.banks["Bob"]
    # Heun evaluates the UNet twice per step at the same timestep: each evaluation gets its own CFG slots
    assert {key[1] for key in bank.keys()} == {0, 1, 2, 3}
    assert len(out.panels) == 2 and story.method.stats["csa_calls"] > 0
