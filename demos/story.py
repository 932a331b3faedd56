"""The Story tab: character line(s) and panel prompts -> a comic strip through ``visattn.pipelines.StoryPipeline``.

Only built when ``StoryPipeline`` exists (see ``app.build_app``).
"""
from __future__ import annotations

from typing import Any

import gradio as gr

from .engine import Engine, run_story
from .widgets import MethodControls, ProgressAdapter, as_int, named, size_controls, user_error

__all__ = ["story_tab"]

EXAMPLE_CHARACTERS = "[Bob] a red circle"
EXAMPLE_PANELS = "[Bob] on a blue background #Day one\n[Bob] on a green background #Day two\n[Bob] at night #The end"


def story_tab(engine: Engine, story_cls: Any, size: int, steps_default: int = 20) -> None:
    """Add the Story tab (inside an open ``gr.Tabs``)."""
    with gr.Tab("Story", id="story"):
        with gr.Row():
            with gr.Column(scale=1):
                characters = gr.Textbox(label="Characters (one per line: [Name] description)", lines=2,
                                        value=EXAMPLE_CHARACTERS, key="story-characters")
                panels = gr.Textbox(label="Panels (one per line; [Name] tags, # caption, [NC] = no character)",
                                    lines=4, value=EXAMPLE_PANELS, key="story-panels")
                negative = gr.Textbox(label="Negative prompt", value="", key="story-negative")
                mode = gr.Dropdown(choices=["bank", "batch"], value="bank", label="Mode", key="story-mode",
                                   info="bank: identity panels first, then the rest read them; batch: panels "
                                        "with the same characters share tokens")
                controls = MethodControls("story", default="consistent", only=["consistent"],
                                          label="Consistency method", open_options=False)
                width, height, steps, guidance, seed = size_controls("story", size, steps_default)
                with gr.Row():
                    btn = gr.Button("Make story", variant="primary", elem_id="story-button")
                    cancel = gr.Button("Cancel", variant="stop")
            with gr.Column(scale=2):
                strip = gr.Image(label="Comic strip", type="pil", format="png", interactive=False,
                                 elem_id="story-strip")
                gallery = gr.Gallery(label="Panels", columns=4, type="pil", format="png")
                info = gr.Textbox(label="Story", interactive=False)

        def on_story(*args):
            progress, args = args[-1], args[:-1]
            chars, pans, neg, md = args[:4]
            w, h, st, g, sd = args[-5:]
            try:
                method = controls.parse(args[4:-5])
                res = run_story(engine, story_cls, chars, (pans or "").splitlines(), method, mode=md,
                                width=as_int("width", w), height=as_int("height", h), steps=as_int("steps", st),
                                guidance=float(g), seed=as_int("seed", sd), negative_prompt=neg or "",
                                progress=ProgressAdapter(progress, "story"))
            except Exception as e:  # noqa: BLE001 - every failure becomes a readable message
                raise user_error(e) from e
            text = f"{len(res.panels)} panels in {res.seconds:.1f} s: " + " | ".join(res.captions)
            return res.strip, [(p, c) for p, c in zip(res.panels, res.captions)], text

        named(on_story, ["characters", "panels", "negative_prompt", "mode", *controls.names,
                         "width", "height", "steps", "guidance", "seed"], progress=True)
        event = btn.click(on_story, inputs=[characters, panels, negative, mode, *controls.inputs, width, height,
                                            steps, guidance, seed],
                          outputs=[strip, gallery, info], api_name="story")
        cancel.click(engine.cancel, None, None, cancels=[event], queue=False, api_visibility="private")
