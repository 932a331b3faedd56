"""The Gradio app `visattn-demo`: Generate, Compare, Story (when available) and Pattern explorer tabs.

    visattn-demo                       # http://127.0.0.1:7860, default model, CUDA when present
    visattn-demo --model path/or/hub-id --port 7861
    visattn-demo --smoke --out demo.png  # start, run one generation through the HTTP API, stop
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

import gradio as gr

from . import explorer
from .engine import Engine, compare_images
from .options import methods
from .widgets import (SIZE_NAMES, MethodControls, ProgressAdapter, as_int, make_request, named, size_controls,
                      user_error)

__all__ = ["build_app", "main"]

CSS = ("#gen-image img, .visattn-pixels img {image-rendering: pixelated; width: 100%; height: 100%; "
       "object-fit: contain}")


def stats_table(rows: List[Dict[str, Any]]):
    """Layout statistics rows (one per attention level) as a table; empty when the method reports none."""
    import pandas as pd

    cols: List[str] = []
    for row in rows:
        cols += [k for k in row if k not in cols]
    return pd.DataFrame([{c: ("" if row.get(c) is None else str(row.get(c))) for c in cols} for row in rows],
                        columns=cols or ["grid", "queries", "keys", "density"])


def _story_pipeline_class():
    """``visattn.pipelines.StoryPipeline`` when it exists, else None (the Story tab is then left out)."""
    try:
        from visattn import pipelines
    except ImportError:
        return None
    return getattr(pipelines, "StoryPipeline", None)


def build_app(engine: Optional[Engine] = None, *, model: Optional[str] = None, device: Optional[str] = None,
              default_size: Optional[int] = None) -> gr.Blocks:
    """Build the Blocks app around ``engine`` (made from ``model``/``device`` when not given; loaded lazily)."""
    engine = engine or Engine(model=model, device=device)
    size = default_size or engine.suggested_size(_has_default_model())
    n_steps = engine.suggested_steps(_has_default_model())
    story_cls = _story_pipeline_class()

    with gr.Blocks(title="visattn demo", analytics_enabled=False) as demo:
        gr.Markdown("# visattn demo\nSwap a diffusion model's self-attention for a visattn method and see what "
                    "it does. Model: `" + engine.short_name() + f"` on `{engine.device}`.")
        with gr.Tabs():
            # ---------------------------------------------------------------- Generate
            with gr.Tab("Generate", id="generate"):
                with gr.Row():
                    with gr.Column(scale=1):
                        prompt = gr.Textbox(label="Prompt", value="", placeholder="a red star on a blue background",
                                            elem_id="gen-prompt", key="gen-prompt")
                        negative = gr.Textbox(label="Negative prompt", value="", key="gen-negative")
                        gen_method = MethodControls("gen", default=_first_sparse())
                        width, height, steps, guidance, seed = size_controls("gen", size, n_steps)
                        with gr.Row():
                            gen_btn = gr.Button("Generate", variant="primary", elem_id="gen-button")
                            gen_cancel = gr.Button("Cancel", variant="stop", elem_id="gen-cancel")
                    with gr.Column(scale=1):
                        gen_image = gr.Image(label="Image", type="pil", format="png", interactive=False, height=384,
                                             elem_id="gen-image")
                        gen_timing = gr.Textbox(label="Timing and memory", interactive=False, elem_id="gen-timing")
                        gen_stats = gr.Dataframe(label="Layout statistics (per self-attention level)",
                                                 elem_id="gen-stats", interactive=False)

                def on_generate(*args):
                    progress, args = args[-1], args[:-1]
                    p, neg = args[0], args[1]
                    w, h, st, g, sd = args[-5:]
                    try:
                        method = gen_method.parse(args[2:-5])
                        req = make_request(p, neg, method, w, h, st, g, sd)
                        res = engine.generate(req, progress=ProgressAdapter(progress, method.name))
                    except Exception as e:  # noqa: BLE001 - every failure becomes a readable message
                        raise user_error(e) from e
                    return res.image, res.timing_text(), stats_table(res.layout_stats)

                named(on_generate, ["prompt", "negative_prompt", *gen_method.names, *SIZE_NAMES], progress=True)
                gen_event = gen_btn.click(on_generate, inputs=[prompt, negative, *gen_method.inputs, width, height,
                                                               steps, guidance, seed],
                                          outputs=[gen_image, gen_timing, gen_stats], api_name="generate")
                gen_cancel.click(engine.cancel, None, None, cancels=[gen_event], queue=False, api_name="cancel")

            # ---------------------------------------------------------------- Compare
            with gr.Tab("Compare", id="compare"):
                with gr.Row():
                    with gr.Column(scale=1):
                        c_prompt = gr.Textbox(label="Prompt", value="a red star on a blue background",
                                              key="cmp-prompt")
                        c_negative = gr.Textbox(label="Negative prompt", value="", key="cmp-negative")
                        cmp_method = MethodControls("cmp", default=_first_sparse())
                        c_w, c_h, c_steps, c_g, c_seed = size_controls("cmp", size, n_steps)
                        with gr.Row():
                            cmp_btn = gr.Button("Compare", variant="primary", elem_id="cmp-button")
                            cmp_cancel = gr.Button("Cancel", variant="stop")
                    with gr.Column(scale=2):
                        with gr.Row():
                            img_dense = gr.Image(label="dense", type="pil", format="png", interactive=False, elem_classes="visattn-pixels",
                                                 height=256)
                            img_method = gr.Image(label="method", type="pil", format="png", interactive=False, elem_classes="visattn-pixels",
                                                  height=256)
                            img_diff = gr.Image(label="difference (amplified)", type="pil", format="png", height=256, elem_classes="visattn-pixels",
                                                interactive=False)
                        cmp_score = gr.Textbox(label="Similarity", interactive=False, elem_id="cmp-score")

                def on_compare(*args):
                    progress, args = args[-1], args[:-1]
                    p, neg = args[0], args[1]
                    w, h, st, g, sd = args[-5:]
                    try:
                        method = cmp_method.parse(args[2:-5])
                        from visattn.methods import get_method
                        base = make_request(p, neg, get_method("dense"), w, h, st, g, sd)
                        r0 = engine.generate(base, progress=ProgressAdapter(progress, "dense"))
                        r1 = engine.generate(make_request(p, neg, method, w, h, st, g, sd),
                                             progress=ProgressAdapter(progress, method.name), new_job=False)
                        cmp = compare_images(r0.image, r1.image)
                    except Exception as e:  # noqa: BLE001
                        raise user_error(e) from e
                    score = (f"PSNR {cmp['psnr']:.2f} dB, SSIM {cmp['ssim']:.4f}, max |diff| {cmp['max_abs']:.0f}/255; "
                             f"dense {r0.ms_per_step:.1f} ms/step, {method.name} {r1.ms_per_step:.1f} ms/step")
                    return r0.image, r1.image, cmp["diff"], score

                named(on_compare, ["prompt", "negative_prompt", *cmp_method.names, *SIZE_NAMES], progress=True)
                cmp_event = cmp_btn.click(on_compare, inputs=[c_prompt, c_negative, *cmp_method.inputs, c_w, c_h,
                                                              c_steps, c_g, c_seed],
                                          outputs=[img_dense, img_method, img_diff, cmp_score], api_name="compare")
                cmp_cancel.click(engine.cancel, None, None, cancels=[cmp_event], queue=False, api_visibility="private")

            # ---------------------------------------------------------------- Story
            if story_cls is not None:
                from .story import story_tab
                story_tab(engine, story_cls, size, n_steps)

            # ---------------------------------------------------------------- Pattern explorer
            with gr.Tab("Pattern explorer", id="explorer"):
                with gr.Row():
                    with gr.Column(scale=1):
                        ex_method = MethodControls("ex", default=_first_sparse())
                        with gr.Row():
                            ex_rows = gr.Number(value=56, precision=0, label="Grid rows", minimum=1,
                                                maximum=explorer.MAX_GRID, key="ex-rows")
                            ex_cols = gr.Number(value=56, precision=0, label="Grid columns", minimum=1,
                                                maximum=explorer.MAX_GRID, key="ex-cols")
                            ex_images = gr.Number(value=1, precision=0, label="Images in batch", minimum=1,
                                                  maximum=8, key="ex-images")
                        with gr.Row():
                            ex_qr = gr.Number(value=20, precision=0, label="Query row", minimum=0, key="ex-qr")
                            ex_qc = gr.Number(value=12, precision=0, label="Query column", minimum=0, key="ex-qc")
                        ex_btn = gr.Button("Show pattern", variant="primary", elem_id="ex-button")
                    with gr.Column(scale=1):
                        ex_image = gr.Image(label="Keys attended (click a square to pick the query)", type="pil",
                                            format="png", interactive=False, elem_id="ex-image")
                        ex_text = gr.Textbox(label="Pattern", interactive=False, elem_id="ex-text")
                        ex_stats = gr.JSON(label="Layout statistics")

                def on_pattern(*args):
                    rows, cols, imgs, qr, qc = args[-5:]
                    try:
                        method = ex_method.parse(args[:-5])
                        return explorer.explore(method, rows, cols, qr, qc, imgs)
                    except Exception as e:  # noqa: BLE001
                        raise user_error(e) from e

                ex_inputs = [*ex_method.inputs, ex_rows, ex_cols, ex_images, ex_qr, ex_qc]
                ex_names = [*ex_method.names, "rows", "cols", "images", "query_row", "query_col"]
                named(on_pattern, ex_names)
                ex_btn.click(on_pattern, inputs=ex_inputs, outputs=[ex_image, ex_text, ex_stats], api_name="pattern",
                             concurrency_limit=None)

                def on_select(*args):
                    evt, args = args[-1], args[:-1]
                    rows, cols = args[-5], args[-4]
                    try:
                        grid = (as_int("grid rows", rows), as_int("grid columns", cols))
                        x, y = evt.index[0], evt.index[1]
                        r, c = explorer.cell_at(x, y, grid)
                        r, c = min(r, grid[0] - 1), min(c, grid[1] - 1)
                        out = on_pattern(*args[:-2], r, c)
                    except gr.Error:
                        raise
                    except Exception as e:  # noqa: BLE001
                        raise user_error(e) from e
                    return (r, c, *out)

                named(on_select, ex_names, select=True)
                ex_image.select(on_select, inputs=ex_inputs, outputs=[ex_qr, ex_qc, ex_image, ex_text, ex_stats],
                                api_visibility="private", concurrency_limit=None)
                demo.load(on_pattern, inputs=ex_inputs, outputs=[ex_image, ex_text, ex_stats],
                          api_visibility="private", concurrency_limit=None)
    demo.queue(max_size=16, default_concurrency_limit=1)
    demo.visattn_engine = engine  # for tests and --smoke
    demo.visattn_css = CSS
    return demo


def _has_default_model() -> bool:
    try:
        from visattn import pipelines
    except ImportError:
        return False
    return getattr(pipelines, "load_default", None) is not None


def _first_sparse() -> str:
    names = [n for n in methods() if n != "dense"]
    for pref in ("neighborhood", "routing", "agent", "consistent"):
        if pref in names:
            return pref
    return names[0] if names else "dense"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="visattn-demo", description="visattn web demo (Gradio)")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--share", action="store_true", help="make a public gradio.live link (off by default)")
    p.add_argument("--model", default=None,
                   help="diffusers pipeline: hub id or local folder; 'tiny' = tiny random-weight pipeline; "
                        "default: the embedded model of the package (offline)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--max-size", type=int, default=None, help="largest width/height allowed (default by device)")
    p.add_argument("--size", type=int, default=None, help="default width/height shown in the UI")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--smoke", action="store_true",
                   help="start on a free local port, run one generation through the HTTP API, save it (--out), stop")
    p.add_argument("--out", default="visattn-demo.png", help="--smoke: where to write the image")
    p.add_argument("--method", default=None, help="--smoke: method to run (default: the first sparse one)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry point of ``visattn-demo``."""
    args = _parser().parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    if not 1 <= args.port <= 65535:
        print(f"visattn-demo: --port must be 1 to 65535, got {args.port}", file=sys.stderr)
        return 2
    if args.method is not None and args.method not in methods():
        print(f"visattn-demo: --method {args.method!r} is not registered; known methods: {list(methods())}",
              file=sys.stderr)
        return 2
    if args.threads is not None:
        if args.threads < 1:
            print(f"visattn-demo: --threads must be >= 1, got {args.threads}", file=sys.stderr)
            return 2
        import torch
        torch.set_num_threads(args.threads)
    try:
        engine = Engine(model=args.model, device=args.device, max_size=args.max_size)
        engine.pipe  # load now so a bad --model fails at start, readably
    except ValueError as e:
        print(f"visattn-demo: {e}", file=sys.stderr)
        return 2
    demo = build_app(engine, default_size=args.size)
    if args.smoke:
        from .smoke import run_smoke
        return run_smoke(demo, engine, out=args.out, method=args.method or _first_sparse(), size=args.size)
    print(f"visattn-demo: {engine.model_name}; serving on http://{args.host}:{args.port}")
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, css=CSS)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
