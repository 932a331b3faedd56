"""The demo's model side: load the pipeline, validate requests, generate with a method, measure it.

Nothing here imports gradio, so it is testable and reusable without a UI.
"""
from __future__ import annotations

import dataclasses
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch

from visattn.methods import AttentionMethod

__all__ = ["Engine", "GenerateRequest", "GenerateResult", "Cancelled", "pick_device", "load_pipeline",
           "compare_images", "run_story", "StoryResult"]

#: the default model: the embedded one when the package ships it, else a tiny random-weight pipeline
DEFAULT_MODEL = "default"
TINY_MODEL = "tiny"


class Cancelled(RuntimeError):
    """Raised when a generation is cancelled from the UI."""


def pick_device(device: Optional[str] = None) -> str:
    """``device`` if given (validated), else "cuda" when available, else "cpu"."""
    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} requested but CUDA is not available; use 'cpu' or 'auto'")
    if not (device == "cpu" or device.startswith("cuda")):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}")
    return device


def load_pipeline(model: Optional[str], device: str):
    """Load the demo's pipeline.

    ``model``: None / "default" (the package's embedded model when ``visattn.pipelines.load_default`` exists,
    else the tiny offline pipeline), "tiny" (tiny random-weight pipeline), or a hub id / local folder for
    ``DiffusionPipeline.from_pretrained`` (fp16 on CUDA).
    """
    if model in (None, "", DEFAULT_MODEL):
        try:
            from visattn import pipelines as _pl
            load_default = getattr(_pl, "load_default", None)
        except ImportError:
            load_default = None
        if load_default is not None:
            import inspect
            import warnings

            try:
                if "device" in inspect.signature(load_default).parameters:
                    return load_default(device=device)
                pipe = load_default()
                return pipe.to(device) if hasattr(pipe, "to") else pipe
            except FileNotFoundError as e:  # weights not shipped in this build: the tiny model still works
                warnings.warn(f"default model unavailable ({e}); using the tiny random-weight pipeline")
        model = TINY_MODEL
    if model == TINY_MODEL:
        from .tiny import tiny_sd_pipeline
        return tiny_sd_pipeline(device=device)
    from diffusers import DiffusionPipeline
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    try:
        pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=dtype)
    except Exception as e:  # noqa: BLE001 - reported to the user as a readable startup error
        raise ValueError(f"--model {model!r} could not be loaded as a diffusers pipeline (a hub id or a local "
                         f"folder with model_index.json): {type(e).__name__}: {e}") from e
    return pipe.to(device)


@dataclass
class GenerateRequest:
    """One generation: everything the Generate tab sends."""

    prompt: str
    negative_prompt: str = ""
    method: AttentionMethod | None = None
    width: int = 64
    height: int = 64
    steps: int = 2
    guidance: float = 5.0
    seed: int = 0


@dataclass
class GenerateResult:
    """The image and what was measured while making it."""

    image: Any  # PIL.Image
    seconds: float
    step_times: List[float]
    peak_memory_mib: Optional[float]
    layout_stats: List[Dict[str, Any]] = field(default_factory=list)
    method: str = "dense"

    @property
    def ms_per_step(self) -> float:
        return 1000.0 * (sum(self.step_times) / len(self.step_times)) if self.step_times else float("nan")

    def timing_text(self) -> str:
        """A one-line summary for the UI."""
        mem = f"{self.peak_memory_mib:.0f} MiB GPU peak" if self.peak_memory_mib is not None else "GPU peak: n/a (CPU)"
        return (f"{self.method}: {self.ms_per_step:.1f} ms/step over {len(self.step_times)} steps, "
                f"{self.seconds:.2f} s total; {mem}")


class _Recorder:
    """Collects the distinct geometries a method sees during a run (for its layout statistics)."""

    def __init__(self) -> None:
        self.geometries: Dict[tuple, Any] = {}

    def wrap(self, method: AttentionMethod) -> AttentionMethod:
        """A copy of ``method`` (same class options) whose calls are recorded."""
        recorder = self
        base = type(method)

        def __call__(self, q, k, v, geometry, **kw):  # noqa: N807
            if not geometry.is_cross:
                recorder.geometries.setdefault((geometry.grid, geometry.seq_len, geometry.kv_len), geometry)
            return base.__call__(self, q, k, v, geometry, **kw)

        rec_cls = type(base.__name__, (base,), {"__call__": __call__, "__module__": base.__module__,
                                                "__qualname__": base.__qualname__})
        kwargs = {f.name: getattr(method, f.name) for f in dataclasses.fields(method) if f.init}
        return rec_cls(**kwargs)


def _stats_rows(method: AttentionMethod, geometries: Dict[tuple, Any]) -> List[Dict[str, Any]]:
    rows = []
    for (grid, seq_len, kv_len), geom in sorted(geometries.items(), key=lambda kv: -kv[0][1]):
        try:
            stats = method.layout_stats(geom)
        except Exception as e:  # noqa: BLE001 - a stats failure must not hide the image
            stats = {"error": f"{type(e).__name__}: {e}"}
        row = {"grid": "x".join(map(str, grid)) if grid else "-", "queries": seq_len, "keys": kv_len}
        if stats is None:
            row["density"] = 1.0 if method.name == "dense" else "dense here (not block-sparse at this size)"
        else:
            row.update({k: (round(v, 4) if isinstance(v, float) else v) for k, v in dict(stats).items()})
        rows.append(row)
    return rows


class Engine:
    """Holds the pipeline (loaded lazily, once), runs one generation at a time, supports cancel."""

    def __init__(self, model: Optional[str] = None, device: Optional[str] = None, *,
                 pipe_factory: Optional[Callable[[], Any]] = None, max_size: Optional[int] = None) -> None:
        self.model = model
        self.device = pick_device(device)
        self._factory = pipe_factory
        self._pipe = None
        self._load_lock = threading.Lock()
        self._run_lock = threading.Lock()
        self._cancel = threading.Event()
        self.max_size = max_size or self.default_max_size(self.device)

    # ---- model -------------------------------------------------------------------------------------
    @staticmethod
    def default_max_size(device: str) -> int:
        """Largest side allowed on ``device``: scaled by GPU memory on CUDA, 512 px on CPU."""
        if device.startswith("cuda"):
            gib = torch.cuda.get_device_properties(torch.device(device)).total_memory / 2**30
            return 2048 if gib >= 40 else 1536 if gib >= 16 else 1024
        return 512

    @property
    def pipe(self):
        """The pipeline (loaded on first use)."""
        if self._pipe is None:
            with self._load_lock:
                if self._pipe is None:
                    pipe = self._factory() if self._factory else load_pipeline(self.model, self.device)
                    if hasattr(pipe, "set_progress_bar_config"):
                        pipe.set_progress_bar_config(disable=True)
                    self._pipe = pipe
        return self._pipe

    @property
    def size_factor(self) -> int:
        """Width and height must be multiples of this (VAE factor times the transformer's patch size)."""
        pipe = self.pipe
        factor = int(getattr(pipe, "vae_scale_factor", 8) or 8)
        denoiser = getattr(pipe, "transformer", None)
        patch = getattr(getattr(denoiser, "config", None), "patch_size", None)
        if isinstance(patch, (tuple, list)):
            patch = max(patch)
        return factor * int(patch or 1)

    def suggested_size(self, has_default_model: bool = False) -> int:
        """Default width/height for the UI: the model's native size when loaded, else a guess from its name."""
        if self._pipe is not None:
            denoiser = getattr(self._pipe, "unet", None) or getattr(self._pipe, "transformer", None)
            sample = getattr(getattr(denoiser, "config", None), "sample_size", None)
            if isinstance(sample, (tuple, list)):
                sample = sample[0]
            if isinstance(sample, int):
                return min(self.max_size, sample * int(getattr(self._pipe, "vae_scale_factor", 8) or 8))
        if self.is_tiny(has_default_model):
            return 64
        return min(512, self.max_size)

    def is_tiny(self, has_default_model: bool = False) -> bool:
        """Whether the model is (or will load as) the tiny random-weight pipeline."""
        if self._pipe is not None:
            return bool(getattr(self._pipe, "_visattn_tiny", False))
        return self.model == TINY_MODEL or (self.model in (None, "", DEFAULT_MODEL) and not has_default_model)

    def suggested_steps(self, has_default_model: bool = False) -> int:
        """Default number of steps for the UI: 2 for the tiny random model (nothing to refine), else 20."""
        return 2 if self.is_tiny(has_default_model) else 20

    def short_name(self) -> str:
        """What the UI calls the model: "tiny (random weights)", "default (embedded)" or the --model value."""
        if self._pipe is not None and getattr(self._pipe, "_visattn_tiny", False):
            return "tiny (random weights)"
        if self.model in (None, "", DEFAULT_MODEL):
            return "default (embedded)" if self._pipe is not None else "default"
        return str(self.model)

    @property
    def model_name(self) -> str:
        pipe = self.pipe
        path = getattr(getattr(pipe, "config", None), "_name_or_path", None) or ""
        return f"{type(pipe).__name__}" + (f" ({path})" if path else "") + f" on {self.device}"

    # ---- validation --------------------------------------------------------------------------------
    def validate(self, req: GenerateRequest) -> None:
        """Raise ValueError naming the parameter and the allowed values when ``req`` cannot run."""
        if not isinstance(req.prompt, str) or not req.prompt.strip():
            raise ValueError("prompt is empty; type what the picture should show")
        f = self.size_factor
        lo = 2 * f
        for name in ("width", "height"):
            v = getattr(req, name)
            if v is None or v != int(v):
                raise ValueError(f"{name} must be a whole number of pixels, got {v!r}")
            v = int(v)
            if v % f:
                raise ValueError(f"{name}={v} is not a multiple of {f} (this model's size factor); "
                                 f"use e.g. {max(lo, (v // f) * f)} or {max(lo, (v // f + 1) * f)}")
            if v < lo or v > self.max_size:
                raise ValueError(f"{name}={v} is outside the sizes this device allows: {lo} to {self.max_size} "
                                 f"pixels on {self.device}")
        if req.steps is None or req.steps != int(req.steps) or not 1 <= int(req.steps) <= 200:
            raise ValueError(f"steps must be an integer from 1 to 200, got {req.steps!r}")
        if req.guidance is None or not math.isfinite(float(req.guidance)) or not 0 <= float(req.guidance) <= 30:
            raise ValueError(f"guidance must be a number from 0 to 30, got {req.guidance!r}")
        if req.seed is None or req.seed != int(req.seed) or not 0 <= int(req.seed) < 2**63:
            raise ValueError(f"seed must be a non-negative integer, got {req.seed!r}")

    # ---- running -----------------------------------------------------------------------------------
    def cancel(self) -> None:
        """Ask the running generation to stop at the end of its current step."""
        self._cancel.set()

    def generate(self, req: GenerateRequest, progress: Optional[Callable[[int, int], None]] = None, *,
                 new_job: bool = True) -> GenerateResult:
        """Run one generation (validated first). ``progress(step, total)`` is called after each step.
        ``new_job=False``: a later part of the same job (Compare's second image), so a pending cancel holds."""
        self.validate(req)
        with self._run_lock:
            if new_job:
                self._cancel.clear()
            elif self._cancel.is_set():
                raise Cancelled("generation cancelled before it started")
            return self._generate(req, progress)

    def _generate(self, req: GenerateRequest, progress) -> GenerateResult:
        import inspect

        pipe = self.pipe
        method = req.method
        name = getattr(method, "name", "dense") or "dense"
        steps = int(req.steps)
        recorder = _Recorder()
        stamps: List[float] = []
        cancelled = {"at": None}

        def on_step_end(p, i, t, kwargs):
            stamps.append(time.perf_counter())
            if progress is not None:
                progress(i + 1, steps)
            if self._cancel.is_set():
                cancelled["at"] = i + 1
                p._interrupt = True
            return kwargs

        call_kwargs: Dict[str, Any] = dict(prompt=req.prompt, width=int(req.width), height=int(req.height),
                                           num_inference_steps=steps, guidance_scale=float(req.guidance),
                                           generator=torch.Generator("cpu").manual_seed(int(req.seed)))
        params = inspect.signature(pipe.__call__).parameters
        if req.negative_prompt and req.negative_prompt.strip() and "negative_prompt" in params:
            call_kwargs["negative_prompt"] = req.negative_prompt
        if "callback_on_step_end" in params:
            call_kwargs["callback_on_step_end"] = on_step_end

        handle = None
        if method is not None:
            wrapped = recorder.wrap(method)
            if hasattr(wrapped, "reset"):
                wrapped.reset()
            import visattn
            try:
                handle = visattn.apply(pipe, wrapped)
            except NotImplementedError:
                if name != "dense":
                    raise ValueError(f"method {name!r} cannot be applied: visattn.apply is not available in this "
                                     f"build; only 'dense' runs") from None
                handle = None  # dense equals the untouched model
        cuda = self.device.startswith("cuda")
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        try:
            start = time.perf_counter()
            with torch.no_grad():
                out = pipe(**call_kwargs)
            if cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
        finally:
            if handle is not None:
                handle.remove()
        if cancelled["at"] is not None:
            raise Cancelled(f"generation cancelled after step {cancelled['at']} of {steps}")
        peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
        edges = [start] + stamps
        step_times = [b - a for a, b in zip(edges, edges[1:])] or [seconds / steps] * steps
        image = out.images[0]
        rows = _stats_rows(method, recorder.geometries) if method is not None else []
        return GenerateResult(image=image, seconds=seconds, step_times=step_times, peak_memory_mib=peak,
                              layout_stats=rows, method=name)


@dataclass
class StoryResult:
    """A generated story: the strip, the panels and their captions."""

    strip: Any
    panels: List[Any]
    captions: List[str]
    seconds: float


def run_story(engine: "Engine", story_cls: Any, characters: str, panels: List[str], method: AttentionMethod, *,
              mode: str = "bank", width: int = 64, height: int = 64, steps: int = 2, guidance: float = 5.0,
              seed: int = 0, negative_prompt: str = "",
              progress: Optional[Callable[[int, int], None]] = None) -> StoryResult:
    """Run ``story_cls(engine.pipe, method, mode=mode)`` on the character line(s) and panel prompts."""
    if not isinstance(characters, str) or not characters.strip():
        raise ValueError("characters is empty; write one line per character like '[Bob] a man with a red hat'")
    panels = [p.strip() for p in panels if p and p.strip()]
    if not panels:
        raise ValueError("panels is empty; write one panel prompt per line, e.g. '[Bob] at the beach #Day one'")
    if len(panels) > 12:
        raise ValueError(f"at most 12 panels per story, got {len(panels)}")
    if mode not in ("bank", "batch"):
        raise ValueError(f"mode must be 'bank' or 'batch', got {mode!r}")
    engine.validate(GenerateRequest(prompt=" ".join(panels), width=width, height=height, steps=steps,
                                    guidance=guidance, seed=seed))
    with engine._run_lock:
        engine._cancel.clear()
        pipe = engine.pipe
        total = int(steps) * len(panels)
        count = {"n": 0, "cancelled": False}

        def on_step_end(p, i, t, kwargs):
            count["n"] += 1
            if progress is not None:
                progress(min(count["n"], total), total)
            if engine._cancel.is_set():
                count["cancelled"] = True
                p._interrupt = True
            return kwargs

        story = story_cls(pipe, method, mode=mode)
        start = time.perf_counter()
        with torch.no_grad():
            out = story(characters, panels, seed=int(seed), num_inference_steps=int(steps),
                        guidance_scale=float(guidance), height=int(height), width=int(width),
                        negative_prompt=negative_prompt or None, callback_on_step_end=on_step_end)
        if count["cancelled"]:
            raise Cancelled("story cancelled")
        return StoryResult(strip=out.strip, panels=list(out.panels), captions=list(out.captions),
                           seconds=time.perf_counter() - start)


def compare_images(a, b) -> Dict[str, Any]:
    """Difference image (|a-b|, amplified to the full range) and similarity scores of two same-size images.

    Returns ``{"diff": PIL image, "psnr": dB (inf when equal), "ssim": mean SSIM in [-1, 1],
    "max_abs": max absolute difference on the 0-255 scale}``.
    """
    from PIL import Image

    x = np.asarray(a.convert("RGB"), dtype=np.float64)
    y = np.asarray(b.convert("RGB"), dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"images differ in size: {x.shape[:2]} vs {y.shape[:2]}")
    d = np.abs(x - y)
    mse = float((d ** 2).mean())
    psnr = float("inf") if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)
    scale = 255.0 / d.max() if d.max() > 0 else 1.0
    diff = Image.fromarray(np.clip(d * scale, 0, 255).astype(np.uint8))
    return {"diff": diff, "psnr": psnr, "ssim": _ssim(x.mean(-1), y.mean(-1)), "max_abs": float(d.max())}


def _ssim(x: np.ndarray, y: np.ndarray, win: int = 7) -> float:
    """Mean SSIM of two gray images (uniform ``win`` x ``win`` window, 0-255 range)."""
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    win = max(1, min(win, x.shape[0], x.shape[1]))

    def box(z):
        c = np.cumsum(np.cumsum(np.pad(z, ((1, 0), (1, 0))), 0), 1)
        return (c[win:, win:] - c[:-win, win:] - c[win:, :-win] + c[:-win, :-win]) / (win * win)

    mx, my = box(x), box(y)
    vx, vy, cxy = box(x * x) - mx ** 2, box(y * y) - my ** 2, box(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return float(s.mean())
