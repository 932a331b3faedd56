"""The demo's functions called directly (no server): option specs, validation, generation, compare, explorer."""
from __future__ import annotations

import dataclasses
from typing import Literal, Optional, Tuple

import numpy as np
import pytest
import torch

gr = pytest.importorskip("gradio")

import visattn  # noqa: E402
from visattn.demos import explorer  # noqa: E402
from visattn.demos.app import build_app, main  # noqa: E402
from visattn.demos.engine import Engine, GenerateRequest, compare_images  # noqa: E402
from visattn.demos.options import (build_method, default_values, option_specs,  # noqa: E402
                                   parse_option)
from visattn.methods import get_method, list_methods  # noqa: E402
from visattn.methods.base import _REGISTRY, AttentionMethod, register_method  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The tiny model runs fastest on one thread (and avoids OpenMP oversubscription on a busy CI machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def engine():
    return Engine(model="tiny", device="cpu")


@pytest.fixture(scope="module")
def app(engine):
    return build_app(engine)


def _sparse_methods():
    return [m for m in list_methods() if m not in ("dense", "consistent")]


def _fn(demo, api_name):
    for block_fn in demo.fns.values():
        if block_fn.api_name == api_name:
            return block_fn.fn
    raise KeyError(api_name)


# ------------------------------------------------------------------------------------------- options
@pytest.mark.parametrize("name", list_methods())
def test_every_method_defaults_round_trip_through_the_ui(name):
    """The controls' default values rebuild exactly the method's default config."""
    specs = option_specs(name)
    assert [s.name for s in specs] == [f.name for f in dataclasses.fields(get_method(name)) if f.init]
    assert build_method(name, default_values(name)) == get_method(name)


def test_option_kinds_from_annotations():
    @register_method("_demo_probe")
    @dataclasses.dataclass
    class Probe(AttentionMethod):
        """Probe method for the demo's option builder."""
        size: int = 7
        ratio: float = 0.5
        causal: bool = False
        mode: Literal["a", "b"] = "a"
        window: Tuple[int, int] = (3, 5)
        seed: Optional[int] = None
        radius: int = dataclasses.field(default=2, metadata={"min": 1, "max": 9, "help": "r"})

    try:
        specs = {s.name: s for s in option_specs("_demo_probe")}
        assert specs["size"].kind == "int" and specs["ratio"].kind == "float" and specs["causal"].kind == "bool"
        assert specs["mode"].kind == "choice" and specs["mode"].choices == ["a", "b"]
        assert specs["window"].kind == "text" and specs["window"].default_text == "3, 5"
        assert specs["seed"].kind == "text" and specs["seed"].default_text == ""
        assert (specs["radius"].minimum, specs["radius"].maximum, specs["radius"].help) == (1, 9, "r")
        m = build_method("_demo_probe", {"window": "4,6", "seed": "3", "mode": "b", "causal": True})
        assert (m.window, m.seed, m.mode, m.causal) == ((4, 6), 3, "b", True)
        assert build_method("_demo_probe", {"seed": ""}).seed is None
        with pytest.raises(ValueError, match=r"'radius'.*out of range.*1 to 9"):
            parse_option(specs["radius"], 12)
        with pytest.raises(ValueError, match=r"'mode'.*allowed values: \['a', 'b'\]"):
            parse_option(specs["mode"], "c")
        with pytest.raises(ValueError, match=r"'size'.*integer"):
            parse_option(specs["size"], 2.5)
        with pytest.raises(ValueError, match=r"unknown option.*'nope'"):
            build_method("_demo_probe", {"nope": 1})
    finally:
        _REGISTRY.pop("_demo_probe", None)


def test_str_options_get_choices_from_the_method_module():
    for name in list_methods():
        for spec in option_specs(name):
            if spec.kind == "choice":
                assert spec.default in spec.choices, (name, spec)
    if "agent" in list_methods():
        merge = {s.name: s for s in option_specs("agent")}["merge"]
        assert merge.kind == "choice" and "pool" in merge.choices


# ------------------------------------------------------------------------------------------- engine
def test_validation_names_parameter_and_allowed_values(engine):
    base = dict(prompt="a cat", width=64, height=64, steps=2, guidance=5.0, seed=0)
    f = engine.size_factor
    cases = [({"prompt": "  "}, "prompt is empty"),
             ({"width": 65}, rf"width=65 is not a multiple of {f}"),
             ({"height": 4096}, r"height=4096 is outside the sizes this device allows: \d+ to \d+"),
             ({"steps": 0}, "steps must be an integer from 1 to 200"),
             ({"guidance": -1.0}, "guidance must be a number from 0 to 30"),
             ({"seed": -3}, "seed must be a non-negative integer")]
    for change, msg in cases:
        with pytest.raises(ValueError, match=msg):
            engine.validate(GenerateRequest(**{**base, **change}))
    engine.validate(GenerateRequest(**base))


def test_generate_dense_size_timing_and_determinism(engine):
    req = GenerateRequest(prompt="a cat", width=64, height=48, steps=2, seed=3, method=get_method("dense"))
    seen = []
    res = engine.generate(req, progress=lambda i, n: seen.append((i, n)))
    assert res.image.size == (64, 48)
    assert np.asarray(res.image).std() > 1.0  # not a blank picture
    assert len(res.step_times) == 2 and all(t > 0 for t in res.step_times)
    assert seen == [(1, 2), (2, 2)]
    assert "ms/step over 2 steps" in res.timing_text()
    again = engine.generate(req)
    assert np.array_equal(np.asarray(res.image), np.asarray(again.image))
    other = engine.generate(dataclasses.replace(req, seed=4))
    assert not np.array_equal(np.asarray(res.image), np.asarray(other.image))


@pytest.mark.parametrize("name", _sparse_methods()[:2])
def test_generate_with_a_sparse_method_reports_layout_levels(engine, name):
    res = engine.generate(GenerateRequest(prompt="a dog", width=64, height=64, steps=1, method=get_method(name)))
    assert res.image.size == (64, 64) and res.method == name
    grids = [row["grid"] for row in res.layout_stats]
    assert "16x16" in grids, res.layout_stats  # the tiny UNet's full-resolution self-attention level


def test_cancel_stops_at_the_next_step(engine):
    from visattn.demos.engine import Cancelled

    def cancel_on_first(i, n):
        engine.cancel()

    with pytest.raises(Cancelled, match="cancelled after step 1 of 3"):
        engine.generate(GenerateRequest(prompt="a cat", steps=3), progress=cancel_on_first)
    assert engine.generate(GenerateRequest(prompt="a cat", steps=1)).image.size == (64, 64)  # still serves
    engine.cancel()  # a cancel between Compare's two runs stops the second one
    with pytest.raises(Cancelled, match="before it started"):
        engine.generate(GenerateRequest(prompt="a cat", steps=1), new_job=False)


def test_compare_images_scores():
    from PIL import Image

    rng = np.random.default_rng(0)
    a = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    same = compare_images(a, a.copy())
    assert same["psnr"] == float("inf") and same["ssim"] == pytest.approx(1.0) and same["max_abs"] == 0
    b = Image.fromarray(np.clip(np.asarray(a).astype(int) + 20, 0, 255).astype(np.uint8))
    diff = compare_images(a, b)
    assert 10 < diff["psnr"] < 40 and diff["ssim"] < 1 and diff["diff"].size == (32, 32)
    with pytest.raises(ValueError, match="differ in size"):
        compare_images(a, a.resize((16, 16)))


# ------------------------------------------------------------------------------------------- explorer
def test_explorer_dense_attends_everything_and_marks_the_query():
    img, text, _ = explorer.explore(get_method("dense"), 8, 6, 2, 3)
    c = explorer.cell_size((8, 6))
    assert img.size == (6 * c, 8 * c)
    assert "attends 48 of 48 keys" in text
    px = np.asarray(img)
    assert tuple(px[2 * c + 1, 3 * c + 1]) == (220, 40, 40)  # the query square is red
    assert tuple(px[0 + 1, 0 + 1]) == (40, 90, 200)          # every other key attended: blue
    assert explorer.cell_at(3 * c + 1, 2 * c + 1, (8, 6)) == (2, 3)
    assert explorer.cell_at(10_000, -5, (8, 6)) == (0, 5)


@pytest.mark.parametrize("name", list_methods())
def test_explorer_works_for_every_method_without_a_model(name):
    img, text, stats = explorer.explore(get_method(name), 28, 28, 14, 14, 2)
    assert img.size[0] == 28 * explorer.cell_size((28, 28))
    assert text.startswith(name)
    assert isinstance(stats, dict)


def test_explorer_rejects_bad_grid():
    with pytest.raises(ValueError, match=r"grid rows must be an integer from 1 to 96"):
        explorer.explore(get_method("dense"), 0, 4, 0, 0)
    with pytest.raises(ValueError, match=r"query column must be an integer from 0 to 3"):
        explorer.explore(get_method("dense"), 4, 4, 0, 9)


# ------------------------------------------------------------------------------------------- app
def test_app_lists_every_method_and_story_tab_follows_storypipeline(app):
    cfg = app.get_config_file()
    dropdowns = [c for c in cfg["components"] if c.get("type") == "dropdown" and c["props"].get("label") == "Method"]
    assert dropdowns, "no method dropdown"
    for d in dropdowns:
        assert sorted(v for _, v in d["props"]["choices"]) == sorted(list_methods())
    tab_labels = {c["props"].get("label") for c in cfg["components"] if c.get("type") == "tabitem"}
    assert {"Generate", "Compare", "Pattern explorer"} <= tab_labels
    has_story = getattr(visattn.pipelines, "StoryPipeline", None) is not None
    assert ("Story" in tab_labels) == has_story
    apis = {fn.api_name for fn in app.fns.values()}
    assert {"generate", "compare", "pattern"} <= apis


def test_app_generate_function_and_readable_errors(app, engine):
    gen = _fn(app, "generate")
    import inspect

    names = list(inspect.signature(gen).parameters)
    assert names[:3] == ["prompt", "negative_prompt", "method"] and names[-6:-1] == ["width", "height", "steps",
                                                                                      "guidance", "seed"]
    defaults = {n: None for n in names}
    values = {"prompt": "a cat", "negative_prompt": "", "method": "dense", "width": 64, "height": 64, "steps": 1,
              "guidance": 5.0, "seed": 0}
    from visattn.demos.options import default_values as dv
    for m in list_methods():
        for k, v in dv(m).items():
            values[f"{m}__{k}"] = v
    args = [values.get(n, defaults[n]) for n in names[:-1]] + [gr.Progress()]
    image, timing, stats = gen(*args)
    assert image.size == (64, 64) and "dense" in timing
    bad = dict(values, width=65)
    with pytest.raises(gr.Error, match="width=65 is not a multiple"):
        gen(*[bad.get(n) for n in names[:-1]], gr.Progress())
    bad = dict(values, prompt="")
    with pytest.raises(gr.Error, match="prompt is empty"):
        gen(*[bad.get(n) for n in names[:-1]], gr.Progress())
    if "routing" in list_methods():  # a bad option combination, reported by the method itself
        bad = dict(values, method="routing", routing__num_regions=2, routing__topk=9)
        with pytest.raises(gr.Error, match=r"method 'routing' rejected its options.*topk"):
            gen(*[bad.get(n) for n in names[:-1]], gr.Progress())
    assert gen(*args)[0].size == (64, 64)  # and it keeps serving


def test_app_compare_function(app):
    cmp_fn = _fn(app, "compare")
    import inspect

    names = list(inspect.signature(cmp_fn).parameters)[:-1]
    values = {"prompt": "a cat", "negative_prompt": "", "method": "dense", "width": 64, "height": 64, "steps": 1,
              "guidance": 5.0, "seed": 1}
    for m in list_methods():
        for k, v in default_values(m).items():
            values[f"{m}__{k}"] = v
    dense_img, method_img, diff, score = cmp_fn(*[values[n] for n in names], gr.Progress())
    assert dense_img.size == method_img.size == diff.size == (64, 64)
    assert score.startswith("PSNR inf dB, SSIM 1.0000")  # dense vs dense with the same seed is identical


def test_main_rejects_a_bad_model_readably(tmp_path, capsys):
    rc = main(["--model", str(tmp_path / "no-such-model"), "--device", "cpu"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "--model" in err and "no-such-model" in err


def test_main_rejects_bad_port_and_method(capsys):
    assert main(["--port", "70000"]) == 2
    assert "--port must be 1 to 65535" in capsys.readouterr().err
    assert main(["--smoke", "--method", "nope"]) == 2
    assert "--method 'nope' is not registered; known methods" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- story
def test_story_makes_a_strip_when_storypipeline_exists(engine):
    story_cls = getattr(visattn.pipelines, "StoryPipeline", None)
    if story_cls is None:
        pytest.skip("visattn.pipelines.StoryPipeline is not in this build (the Story tab is hidden)")
    from visattn.demos.engine import run_story

    seen = []
    res = run_story(engine, story_cls, "[Bob] a red circle", ["[Bob] on blue #one", "[Bob] on green #two"],
                    get_method("consistent"), steps=1, progress=lambda i, n: seen.append(i))
    assert [p.size for p in res.panels] == [(64, 64), (64, 64)]
    assert res.captions == ["one", "two"] and res.strip.size[0] > 128
    assert seen and seen[-1] == 2
    with pytest.raises(ValueError, match="unknown character"):
        run_story(engine, story_cls, "[Bob] a red circle", ["[Ann] at home"], get_method("consistent"), steps=1)
    with pytest.raises(ValueError, match="characters is empty"):
        run_story(engine, story_cls, " ", ["[Bob] at home"], get_method("consistent"), steps=1)


def test_stats_table_has_one_row_per_level():
    from visattn.demos.app import stats_table

    df = stats_table([{"grid": "16x16", "density": 0.5}, {"grid": "8x8", "full": 3}])
    assert list(df.columns) == ["grid", "density", "full"] and len(df) == 2
    assert df.iloc[1]["density"] == "" and df.iloc[1]["full"] == "3"
    assert list(stats_table([]).columns) == ["grid", "queries", "keys", "density"]
