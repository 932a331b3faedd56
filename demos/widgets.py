"""Building blocks of the demo UI: option controls per method, size controls, error and progress plumbing."""
from __future__ import annotations

import inspect
from typing import Any, Dict, List, Optional, Sequence, Tuple

import gradio as gr

from visattn.methods import AttentionMethod

from .engine import Cancelled, GenerateRequest
from .options import OptionSpec, build_method, method_doc, methods, option_specs

__all__ = ["MethodControls", "component", "named", "size_controls", "as_int", "make_request", "user_error",
           "ProgressAdapter", "SIZE_NAMES"]


def component(spec: OptionSpec, key: str):
    """The Gradio control for one option."""
    info = spec.help or None
    label = spec.name
    if spec.kind == "bool":
        return gr.Checkbox(value=bool(spec.default), label=label, info=info, key=key)
    if spec.kind == "choice":
        choices = [("None" if c is None else str(c), c) for c in spec.choices or []]
        return gr.Dropdown(choices=choices, value=spec.default, label=label, info=info, key=key)
    if spec.kind == "int":
        if spec.minimum is not None and spec.maximum is not None and spec.maximum - spec.minimum <= 256:
            return gr.Slider(minimum=spec.minimum, maximum=spec.maximum, step=spec.step or 1,
                             value=spec.default, label=label, info=info, key=key)
        return gr.Number(value=spec.default, precision=0, minimum=spec.minimum, maximum=spec.maximum,
                         label=label, info=info, key=key)
    if spec.kind == "float":
        return gr.Number(value=spec.default, minimum=spec.minimum, maximum=spec.maximum, step=spec.step or 0.01,
                         label=label, info=info, key=key)
    hint = "comma list, e.g. 7, 7; empty = None"
    return gr.Textbox(value=spec.default_text, label=label, info=info or hint, key=key, max_lines=1)


def named(fn, names: Sequence[str], *, progress: bool = False, select: bool = False):
    """Give a ``*args`` handler a real signature: readable API parameter names for gradio_client, and the
    special ``evt: gr.SelectData`` / ``progress=gr.Progress()`` parameters gradio fills in positionally."""
    P = inspect.Parameter
    params = [P(n, P.POSITIONAL_OR_KEYWORD) for n in names]
    if select:
        params.append(P("evt", P.POSITIONAL_OR_KEYWORD, annotation=gr.SelectData))
        fn.__annotations__ = {"evt": gr.SelectData}
    if progress:
        params.append(P("progress", P.POSITIONAL_OR_KEYWORD, default=gr.Progress()))
    fn.__signature__ = inspect.Signature(params)
    return fn


class MethodControls:
    """A method dropdown plus, per registered method, a group with controls for its options."""

    def __init__(self, prefix: str, default: str = "dense", label: str = "Method",
                 only: Optional[Sequence[str]] = None, open_options: bool = True) -> None:
        names = [n for n in methods() if only is None or n in only]
        default = default if default in names else names[0]
        self.methods = names
        self.dropdown = gr.Dropdown(choices=names, value=default, label=label, key=f"{prefix}-method")
        self.doc = gr.Markdown(method_doc(default))
        self.groups: Dict[str, Any] = {}
        self.fields: List[Tuple[str, str, Any]] = []
        with gr.Accordion("Method options", open=open_options):
            for name in names:
                specs = option_specs(name)
                with gr.Group(visible=name == default) as group:
                    if not specs:
                        gr.Markdown(f"`{name}` has no options.")
                    for spec in specs:
                        comp = component(spec, key=f"{prefix}-{name}-{spec.name}")
                        comp.elem_id = f"{prefix}-{name}-{spec.name}"
                        self.fields.append((name, spec.name, comp))
                self.groups[name] = group
        self.dropdown.change(self._switch, inputs=self.dropdown, outputs=[self.doc, *self.groups.values()],
                             queue=False, api_visibility="private")

    def _switch(self, name: str):
        return [method_doc(name)] + [gr.Group(visible=n == name) for n in self.groups]

    @property
    def names(self) -> List[str]:
        """API parameter names of :attr:`inputs`: ``method``, then ``<method>__<option>``."""
        return ["method"] + [f"{m}__{opt}" for m, opt, _ in self.fields]

    @property
    def inputs(self) -> List[Any]:
        """Components to pass to an event: the dropdown, then every option control."""
        return [self.dropdown] + [c for _, _, c in self.fields]

    def parse(self, values: Sequence[Any]) -> AttentionMethod:
        """The method instance from the values of :attr:`inputs` (ValueError on bad input)."""
        name, rest = values[0], values[1:]
        if name not in self.methods:
            raise ValueError(f"unknown method {name!r}; known methods: {self.methods}")
        opts = {opt: v for (m, opt, _), v in zip(self.fields, rest) if m == name}
        return build_method(name, opts)


SIZE_NAMES = ["width", "height", "steps", "guidance", "seed"]


def as_int(name: str, v: Any) -> int:
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a whole number, got {v!r}") from None
    if f != int(f):
        raise ValueError(f"{name} must be a whole number, got {v!r}")
    return int(f)


def make_request(prompt, negative, method, width, height, steps, guidance, seed) -> GenerateRequest:
    try:
        guidance = float(guidance)
    except (TypeError, ValueError):
        raise ValueError(f"guidance must be a number from 0 to 30, got {guidance!r}") from None
    return GenerateRequest(prompt=prompt or "", negative_prompt=negative or "", method=method,
                           width=as_int("width", width), height=as_int("height", height),
                           steps=as_int("steps", steps), guidance=guidance, seed=as_int("seed", seed))


def user_error(e: BaseException) -> gr.Error:
    """A readable gr.Error for anything a generation raised (the app keeps serving)."""
    import torch

    if isinstance(e, Cancelled):
        return gr.Error(str(e), title="Cancelled", print_exception=False)
    if isinstance(e, ValueError):
        return gr.Error(str(e), title="Invalid input", print_exception=False)
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return gr.Error("the GPU ran out of memory; try a smaller width/height or fewer images", title="Out of memory")
    return gr.Error(f"{type(e).__name__}: {e}", title="Generation failed")


class ProgressAdapter:
    """Adapts gr.Progress to the engine's ``progress(step, total)`` callback."""

    def __init__(self, progress: Optional[gr.Progress], label: str) -> None:
        self.progress, self.label = progress, label

    def __call__(self, step: int, total: int) -> None:
        if self.progress is not None:
            self.progress(step / total, desc=f"{self.label}: step {step}/{total}")


def size_controls(prefix: str, size: int, steps_default: int = 20):
    """Width, height, steps, guidance and seed controls (elem ids ``<prefix>-width`` ...)."""
    with gr.Row():
        width = gr.Number(value=size, precision=0, label="Width", key=f"{prefix}-width", elem_id=f"{prefix}-width")
        height = gr.Number(value=size, precision=0, label="Height", key=f"{prefix}-height",
                           elem_id=f"{prefix}-height")
    with gr.Row():
        steps = gr.Slider(1, 100, value=steps_default, step=1, label="Steps", key=f"{prefix}-steps",
                          elem_id=f"{prefix}-steps")
        guidance = gr.Slider(0, 20, value=5.0, step=0.5, label="Guidance", key=f"{prefix}-guidance")
        seed = gr.Number(value=0, precision=0, label="Seed", minimum=0, key=f"{prefix}-seed")
    return width, height, steps, guidance, seed
