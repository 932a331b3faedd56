"""`StoryPipeline`: consistent multi-panel stories on any diffusers text-to-image pipeline.

    story = StoryPipeline(pipe)                                   # or StoryPipeline.from_pretrained("./folder")
    out = story("[Bob] a man with a red hat", ["[Bob] at the beach #Day one", "[Bob] in a cafe", "[NC] a quiet street"],
                seed=1, num_inference_steps=35, guidance_scale=5.0)
    out.panels, out.strip                                         # PIL images; out.banks["Bob"].save("bob.safetensors")

Prompt protocol (as the released StoryDiffusion app): character lines ``[Name] description``; panel lines
name characters with ``[Name]`` (replaced by the description), ``#`` starts the caption, ``[NC]`` marks a
panel with no character. With exactly one character an untagged panel is about that character.

``mode="bank"`` (default, the app's): for each character the first ``id_images`` panels that show only that
character run first as one batch and fill its :class:`IdentityBank`; every other panel runs alone and
attends to the banks of the characters it names. ``mode="batch"`` (the paper's): panels with the same
characters run as one batch and share sampled tokens with each other. Every panel uses the same seed
(the same initial noise), as the app does.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import textwrap
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

__all__ = ["StoryPipeline", "StoryOutput", "parse_story", "comic_strip"]

_TAG = re.compile(r"\[([^\[\]]+)\]")
NC = "NC"
CONFIG_NAME = "story_config.json"


@dataclass
class StoryOutput:
    """Panels in story order, the comic strip, and what was generated how."""

    panels: List[Any]
    strip: Any
    prompts: List[str]
    captions: List[str]
    characters: List[List[str]]
    identity_panels: Dict[str, List[int]]
    banks: Dict[str, Any] = field(default_factory=dict)


def _parse_characters(characters: Union[str, Sequence[str]]) -> Dict[str, str]:
    lines = characters.splitlines() if isinstance(characters, str) else list(characters)
    out: Dict[str, str] = {}
    for line in (ln.strip() for ln in lines):
        if not line:
            continue
        m = re.match(r"^\[([^\[\]]+)\]\s*(.*)$", line)
        if m is None:
            raise ValueError(f"character line {line!r} must start with a tag like '[Bob] a man in a black suit'")
        name, desc = m.group(1).strip(), m.group(2).strip()
        if name == NC:
            raise ValueError("[NC] is reserved for panels without a character; pick another character name")
        if not desc:
            raise ValueError(f"character [{name}] has no description")
        if name in out:
            raise ValueError(f"character [{name}] is described twice")
        out[name] = desc
    return out


def parse_story(characters: Union[str, Sequence[str]], panels: Sequence[str]
                ) -> Tuple[Dict[str, str], List[str], List[str], List[List[str]]]:
    """-> (descriptions by name, prompts, captions, character names per panel). Raises on unknown tags."""
    if isinstance(panels, str) or not panels:
        raise ValueError("panels must be a non-empty list of panel prompts")
    desc = _parse_characters(characters)
    prompts, captions, who = [], [], []
    for i, raw in enumerate(panels):
        text, _, caption = str(raw).partition("#")
        tags = [t.strip() for t in _TAG.findall(text)]
        unknown = [t for t in tags if t != NC and t not in desc]
        if unknown:
            known = ", ".join(f"[{n}]" for n in desc) or "none"
            raise ValueError(f"panel {i} ({raw!r}) names unknown character [{unknown[0]}]; known characters: "
                             f"{known}; use [NC] for a panel without a character")
        names = list(dict.fromkeys(t for t in tags if t != NC))
        if NC in tags and names:
            raise ValueError(f"panel {i} ({raw!r}) has [NC] and a character tag; use one or the other")
        if not tags and len(desc) == 1:
            names = list(desc)
            text = f"{desc[names[0]]}, {text.strip()}"
        elif not tags and len(desc) > 1:
            raise ValueError(f"panel {i} ({raw!r}) has no character tag and the story has several characters; "
                             f"tag it with {', '.join(f'[{n}]' for n in desc)} or [NC]")
        prompt = _TAG.sub(lambda m: desc.get(m.group(1).strip(), ""), text)
        prompt = re.sub(r"\s+", " ", prompt).strip(" ,")
        prompts.append(prompt)
        captions.append(caption.strip() if caption.strip() else re.sub(r"\s+", " ", _TAG.sub("", text)).strip(" ,"))
        who.append(names)
    return desc, prompts, captions, who


def comic_strip(images: Sequence[Any], captions: Optional[Sequence[str]] = None, *, columns: Optional[int] = None,
                padding: int = 8, background: str = "white", text_color: str = "black"):
    """A Pillow grid of ``images`` (``columns`` wide, default up to 4) with optional captions under each."""
    from PIL import Image, ImageDraw, ImageFont

    if not images:
        raise ValueError("comic_strip needs at least one image")
    if columns is not None and (not isinstance(columns, int) or columns < 1):
        raise ValueError(f"columns must be a positive int, got {columns!r}")
    cols = min(columns or 4, len(images))
    rows = (len(images) + cols - 1) // cols
    w = max(im.width for im in images)
    h = max(im.height for im in images)
    font = ImageFont.load_default()
    line_h = 12
    wrap = max(8, w // 6)
    wrapped = [textwrap.wrap(c or "", wrap)[:4] for c in captions] if captions else None
    cap_h = (max((len(x) for x in wrapped), default=0) * line_h + padding) if wrapped else 0
    cell_h = h + cap_h
    canvas = Image.new("RGB", (cols * w + (cols + 1) * padding, rows * cell_h + (rows + 1) * padding), background)
    draw = ImageDraw.Draw(canvas)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        x, y = padding + c * (w + padding), padding + r * (cell_h + padding)
        canvas.paste(im.convert("RGB"), (x, y))
        if wrapped:
            for j, line in enumerate(wrapped[i]):
                draw.text((x, y + h + padding // 2 + j * line_h), line, fill=text_color, font=font)
    return canvas


class StoryPipeline:
    """Consistent multi-panel stories on a diffusers text-to-image pipeline (see the module docstring).

    ``method``: a :class:`visattn.methods.Consistent` (default options from the released app); extra keyword
    options build one. ``bank_device`` ("cpu": offload identity banks), ``bank_dtype``, ``max_bank_bytes``
    configure the identity banks. ``cfg_chunks``: how the wrapped pipeline batches CFG (None: 2 when
    ``guidance_scale > 1``, 1 for Flux-style pipelines). ``same_noise`` (True, as the app): every panel starts
    from the seed's initial noise; False gives panel i its own noise (derived from seed and i).
    """

    def __init__(self, pipe: Any, method: Any = None, *, mode: str = "bank", bank_device: Optional[str] = "cpu",
                 bank_dtype: Optional[torch.dtype] = None, max_bank_bytes: Optional[int] = None,
                 cfg_chunks: Optional[int] = None, same_noise: bool = True, **method_options: Any) -> None:
        from visattn.methods import Consistent

        if method is None:
            method = Consistent(**method_options)
        elif method_options:
            method = dataclasses.replace(method, **method_options)
        if not isinstance(method, Consistent):
            raise TypeError(f"method must be a visattn.methods.Consistent, got {type(method).__name__}")
        if mode not in ("bank", "batch"):
            raise ValueError(f"mode must be 'bank' or 'batch', got {mode!r}")
        self.pipe, self.method, self.mode = pipe, method, mode
        self.bank_device, self.bank_dtype, self.max_bank_bytes = bank_device, bank_dtype, max_bank_bytes
        self.cfg_chunks = cfg_chunks
        self.same_noise = bool(same_noise)

    def _cfg_chunks(self, guidance_scale: float) -> int:
        """CFG split of the denoiser batch. Every panel starts from the same noise, so the adapters' detection
        (equal latent chunks) would be ambiguous: state it. Flux-style pipelines never batch CFG."""
        if self.cfg_chunks is not None:
            return self.cfg_chunks
        if "Flux" in type(self.pipe).__name__:
            return 1
        return 2 if guidance_scale > 1.0 else 1

    # ------------------------------------------------------------------ persistence
    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike], *, pipeline_cls: Any = None,
                        torch_dtype: Optional[torch.dtype] = None, **kwargs: Any) -> "StoryPipeline":
        """Load a local diffusers pipeline folder (no network) plus its ``story_config.json`` if present."""
        path = os.fspath(path)
        if not os.path.isfile(os.path.join(path, "model_index.json")):
            raise FileNotFoundError(f"{path!r} is not a local diffusers pipeline folder (no model_index.json)")
        if pipeline_cls is None:
            from diffusers import DiffusionPipeline as pipeline_cls
        pipe = pipeline_cls.from_pretrained(path, torch_dtype=torch_dtype, local_files_only=True)
        cfg: Dict[str, Any] = {}
        cfg_path = os.path.join(path, CONFIG_NAME)
        if os.path.isfile(cfg_path):
            with open(cfg_path) as f:
                cfg = json.load(f)
        opts = dict(cfg.get("method", {}))
        if "gate" in opts:
            opts["gate"] = tuple(opts["gate"])
        keys = ("mode", "bank_device", "max_bank_bytes", "cfg_chunks", "same_noise")
        story = {k: v for k, v in cfg.items() if k in keys}
        story.update({k: kwargs.pop(k) for k in list(kwargs) if k in ("mode", "bank_device", "max_bank_bytes",
                                                                      "bank_dtype", "method", "cfg_chunks",
                                                                      "same_noise")})
        opts.update(kwargs)
        return cls(pipe, **story, **opts)

    def save_pretrained(self, path: Union[str, os.PathLike]) -> None:
        """Save the wrapped pipeline (``pipe.save_pretrained``) and the story settings (``story_config.json``)."""
        path = os.fspath(path)
        self.pipe.save_pretrained(path)
        opts = {f.name: getattr(self.method, f.name) for f in dataclasses.fields(self.method)}
        if callable(opts["layers"]):
            raise ValueError("cannot save a method whose `layers` is a callable; use a string or tuple of substrings")
        opts["gate"] = list(opts["gate"])
        if isinstance(opts["layers"], tuple):
            opts["layers"] = list(opts["layers"])
        with open(os.path.join(path, CONFIG_NAME), "w") as f:
            json.dump({"method": opts, "mode": self.mode, "bank_device": self.bank_device,
                       "max_bank_bytes": self.max_bank_bytes, "cfg_chunks": self.cfg_chunks,
                       "same_noise": self.same_noise}, f, indent=2)

    def to(self, device: Union[str, torch.device]) -> "StoryPipeline":
        self.pipe.to(device)
        return self

    # ------------------------------------------------------------------ generation
    def _run(self, prompts: List[str], seed: int, kw: Dict[str, Any], panel_ids: Sequence[int] = ()) -> List[Any]:
        if self.same_noise:  # the released app: every panel starts from the seed's noise
            gens = [torch.Generator(device="cpu").manual_seed(seed) for _ in prompts]
        else:
            gens = [torch.Generator(device="cpu").manual_seed(seed + 1000003 * (i + 1)) for i in panel_ids]
        res = self.pipe(prompt=prompts, generator=gens, output_type="pil", **kw)
        return list(res.images)

    def _new_bank(self, name: str, description: str):
        from visattn.methods import IdentityBank

        return IdentityBank(name, device=self.bank_device, dtype=self.bank_dtype, max_bytes=self.max_bank_bytes,
                            meta={"description": description})

    def __call__(self, characters: Union[str, Sequence[str]], panels: Sequence[str], *, seed: int = 0,
                 num_inference_steps: int = 35, guidance_scale: float = 5.0, height: Optional[int] = None,
                 width: Optional[int] = None, negative_prompt: Optional[str] = None, id_images: Optional[int] = None,
                 mode: Optional[str] = None, banks: Optional[Dict[str, Any]] = None, captions: bool = True,
                 columns: Optional[int] = None, **pipe_kwargs: Any) -> StoryOutput:
        """Generate the panels of a story. ``banks``: previously saved identity banks by character name (their
        identity images are then not regenerated). Extra keyword arguments go to the wrapped pipeline."""
        import visattn
        from visattn.methods import IdentityBank

        mode = mode or self.mode
        if mode not in ("bank", "batch"):
            raise ValueError(f"mode must be 'bank' or 'batch', got {mode!r}")
        if not 0.0 <= float(self.method.sample_rate) <= 1.0:
            raise ValueError(f"sample_rate must be in [0, 1], got {self.method.sample_rate!r}")
        L = self.method.id_images if id_images is None else id_images
        if not isinstance(L, int) or L < 1:
            raise ValueError(f"id_images must be an int >= 1, got {L!r}")
        if not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        desc, prompts, caps, who = parse_story(characters, panels)
        if L > len(prompts):
            raise ValueError(f"id_images={L} is more than the number of panels ({len(prompts)})")
        banks = dict(banks or {})
        for name, b in banks.items():
            if name not in desc:
                raise ValueError(f"banks has a bank for unknown character [{name}]; known: {list(desc)}")
            if not isinstance(b, IdentityBank):
                raise TypeError(f"banks[{name!r}] must be an IdentityBank, got {type(b).__name__}")
        kw = dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, **pipe_kwargs)
        if height is not None:
            kw["height"] = height
        if width is not None:
            kw["width"] = width
        if negative_prompt is not None:
            kw["negative_prompt"] = negative_prompt
        images: List[Any] = [None] * len(prompts)
        ident: Dict[str, List[int]] = {}
        m = self.method
        with visattn.apply(self.pipe, m, layers=m.layer_filter(), cfg_chunks=self._cfg_chunks(guidance_scale)):
            try:
                if mode == "batch":
                    groups: Dict[Tuple[str, ...], List[int]] = {}
                    for i, names in enumerate(who):
                        groups.setdefault(tuple(names), []).append(i)
                    for names, idx in groups.items():
                        m.set_batch()
                        # panels without a character never share; a batch of one is exactly plain attention
                        chunks = [[i] for i in idx] if not names else [idx]
                        for ch in chunks:
                            for i, im in zip(ch, self._run([prompts[i] for i in ch], seed, kw, ch)):
                                images[i] = im
                else:
                    for name in desc:
                        if name in banks:
                            continue
                        solo = [i for i, names in enumerate(who) if names == [name]]
                        if not any(name in names for names in who):
                            continue
                        if len(solo) < L:
                            raise ValueError(f"character [{name}] needs {L} identity panel(s) showing only them, "
                                             f"found {len(solo)}; lower id_images or add panels with only [{name}]")
                        ident[name] = solo[:L]
                        bank = self._new_bank(name, desc[name])
                        m.set_write(bank)
                        for i, im in zip(ident[name], self._run([prompts[i] for i in ident[name]], seed, kw,
                                                                 ident[name])):
                            images[i] = im
                        banks[name] = bank
                    for i, names in enumerate(who):
                        if images[i] is not None:
                            continue
                        if names:
                            m.set_read(*[banks[n] for n in names])
                        else:
                            m.set_batch()
                        images[i] = self._run([prompts[i]], seed, kw, [i])[0]
            finally:
                m.set_batch()
        strip = comic_strip(images, caps if captions else None, columns=columns)
        return StoryOutput(images, strip, prompts, caps, who, ident, banks)
