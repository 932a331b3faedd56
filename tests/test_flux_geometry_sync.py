"""Flux geometry without per-call host reads: the ``img_ids`` grid is cached by tensor identity + version
(adapters/diffusers.py ``_IdsGrid``) and a timestep that needs a device read is deferred until something asks
for the step (adapters/base.py ``RunState.denoiser_call``). Values must stay exactly what eager reads give."""
from __future__ import annotations

import contextlib
import copy
import gc
import pickle
from dataclasses import dataclass, field
from typing import List

import pytest
import torch

import visattn
import visattn.adapters.base as vbase
import visattn.adapters.diffusers as vdiff
from visattn.adapters.base import LayerCtx, RunState
from visattn.geometry import TokenGeometry
from visattn.methods import Consistent, Dense, Neighborhood

import _tiny_models as tm

NA = dict(kernel_size=3)


def _ids(h: int, w: int) -> torch.Tensor:
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3)


def _out(model, kw):
    with torch.no_grad():
        return model(**kw, return_dict=False)[0]


@contextlib.contextmanager
def _host_reads():
    """Count calls that read tensor data on the host (item/tolist/int/float/bool/index/cpu/numpy/torch.equal)."""
    log: List[str] = []
    saved = {}
    names = ("item", "tolist", "__int__", "__float__", "__bool__", "__index__", "cpu", "numpy")
    for n in names:
        orig = getattr(torch.Tensor, n)
        saved[n] = orig

        def wrap(self, *a, _n=n, _orig=orig, **k):
            log.append(_n)
            return _orig(self, *a, **k)

        setattr(torch.Tensor, n, wrap)
    eq = torch.equal

    def equal(*a, **k):
        log.append("equal")
        return eq(*a, **k)

    torch.equal = equal
    try:
        yield log
    finally:
        for n, orig in saved.items():
            setattr(torch.Tensor, n, orig)
        torch.equal = eq


@pytest.fixture
def hook_reads(monkeypatch):
    """Host reads made inside the geometry hook, one list per denoiser call."""
    per_call: List[List[str]] = []
    orig = vdiff._GeometryHook.pre_forward

    def pre_forward(self, module, *a, **k):
        with _host_reads() as log:
            out = orig(self, module, *a, **k)
        per_call.append(list(log))
        return out

    monkeypatch.setattr(vdiff._GeometryHook, "pre_forward", pre_forward)
    return per_call


@pytest.fixture
def grid_reads(monkeypatch):
    """Calls of _grid_from_ids (the readback of the ids' extents), with the grid each returned."""
    calls: List = []
    orig = vdiff._grid_from_ids

    def spy(ids):
        g = orig(ids)
        calls.append(g)
        return g

    monkeypatch.setattr(vdiff, "_grid_from_ids", spy)
    return calls


# ----------------------------------------------------------------------------------------------- the ids grid
def test_same_ids_object_reads_the_grid_once_and_the_hook_reads_nothing_after(hook_reads, grid_reads):
    model, kw = tm.tiny_flux(), tm.flux_inputs(grid=(3, 5))
    with visattn.apply(model, Neighborhood(**NA)) as h:
        first = _out(model, kw)
        second = _out(model, kw)
        third = _out(model, dict(kw, timestep=torch.tensor([0.25])))  # another step, same ids object
        assert h.state.grid == (3, 5)
    assert grid_reads == [(3, 5)]
    # first call: the grid's one readback; later calls: none (timesteps deferred, grid cached, batch 1: no CFG test)
    assert hook_reads == [["tolist"], [], []]
    assert torch.equal(first, second) and not torch.equal(first, third)


def test_in_place_edit_of_the_ids_recomputes_the_grid(grid_reads):
    model, kw = tm.tiny_flux(), tm.flux_inputs(grid=(3, 5))
    fresh = copy.deepcopy(model)
    ids = kw["img_ids"]
    with visattn.apply(model, Neighborhood(**NA)) as h:
        _out(model, kw)
        ids.copy_(_ids(5, 3))  # same object, same N = 15, other aspect ratio: the version is bumped
        out = _out(model, kw)
        assert h.state.grid == (5, 3)
        assert {g.grid for g in h.geometries().values()} == {(5, 3)}
        ids[:, 0].add_(0)  # an in-place write through a view bumps the shared version too
        _out(model, kw)
    assert grid_reads == [(3, 5), (5, 3), (5, 3)]
    with visattn.apply(fresh, Neighborhood(**NA)):
        ref = _out(fresh, dict(kw, img_ids=_ids(5, 3)))
    assert torch.equal(out, ref)


def test_a_new_ids_tensor_with_the_same_token_count_recomputes(grid_reads):
    model, kw = tm.tiny_flux(), tm.flux_inputs(grid=(3, 5))
    with visattn.apply(model, Neighborhood(**NA)) as h:
        for i in range(6):  # freed and new tensors may reuse an address: identity is by weak reference
            hw = (3, 5) if i % 2 == 0 else (5, 3)
            kw["img_ids"] = _ids(*hw)
            gc.collect()
            _out(model, kw)
            assert h.state.grid == hw
        kw["img_ids"] = kw["img_ids"].clone()  # equal values, new object: read again
        _out(model, kw)
    assert len(grid_reads) == 7


def test_views_and_inference_tensors_are_not_taken_for_the_cached_ids(grid_reads):
    model, kw = tm.tiny_flux(), tm.flux_inputs(grid=(3, 5))
    with visattn.apply(model, Neighborhood(**NA)) as h:
        base = _ids(3, 5)
        _out(model, dict(kw, img_ids=base))
        _out(model, dict(kw, img_ids=base[:]))  # a view of the cached tensor is another object
        assert len(grid_reads) == 2
        with torch.inference_mode():
            inf = _ids(5, 3)  # inference tensors have no version counter: never cached
            _out(model, dict(kw, img_ids=inf))
            _out(model, dict(kw, img_ids=inf))
        assert h.state.grid == (5, 3)
    assert grid_reads == [(3, 5), (3, 5), (5, 3), (5, 3)]


def test_batched_3d_ids_and_non_tiling_ids():
    assert vdiff._grid_from_ids(_ids(4, 6)[None].expand(2, -1, -1)) == (4, 6)
    bad = _ids(3, 5)
    bad[-1, 2] = 9  # cols span 10: does not tile 15 tokens
    assert vdiff._grid_from_ids(bad) is None
    cache = vdiff._IdsGrid()
    assert cache(bad) is None and cache(bad) is None


# ----------------------------------------------------------------------------------------------- outputs
def test_outputs_equal_the_uncached_path(monkeypatch):
    kw = tm.flux_inputs(grid=(3, 5), seed=3)
    steps = [torch.tensor([t]) for t in (1.0, 0.75, 0.5)]
    model = tm.tiny_flux()
    with visattn.apply(model, Neighborhood(**NA)):
        cached = [_out(model, dict(kw, timestep=t)) for t in steps]
    # uncached: the grid read on every call and every timestep read at once, as before
    monkeypatch.setattr(vdiff._IdsGrid, "__call__", lambda self, ids: vdiff._grid_from_ids(ids))
    monkeypatch.setattr(RunState, "_can_defer", lambda self, sample: False)
    model = tm.tiny_flux()
    with visattn.apply(model, Neighborhood(**NA)):
        eager = [_out(model, dict(kw, timestep=t)) for t in steps]
    for a, b in zip(cached, eager):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------- the step
StepRecorder = tm.GeometryRecorder


@dataclass
class EagerStepRecorder(StepRecorder):
    """Same, but reads the step inside attend (as step-window methods do)."""

    steps: List = field(default_factory=list, compare=False, repr=False)

    def attend(self, q, k, v, geometry, *, scale=None, attn_mask=None):
        self.steps.append(geometry.step)
        return super().attend(q, k, v, geometry, scale=scale, attn_mask=attn_mask)


TS = [1.0, 0.75, 0.75, 0.5, 1.0, 0.5]  # a repeated step (separate CFG pass), then a new run (larger timestep)
STEPS = [0, 1, 1, 2, 0, 1]


def test_deferred_geometries_read_late_give_each_calls_step(hook_reads):
    model, kw = tm.tiny_flux(), tm.flux_inputs(grid=(3, 5))
    m = StepRecorder()
    with visattn.apply(model, m) as h:
        for t in TS:
            _out(model, dict(kw, timestep=torch.tensor([t])))
        assert len(h.state._deferred) == len(TS)  # nothing asked for the step yet
        assert all(r == [] for r in hook_reads[1:])
        # 2 layers per call; read only now
        assert [g.step for g in m.log] == [s for s in STEPS for _ in range(2)]
        assert [g.timestep for g in m.log[::2]] == TS
        assert not h.state._deferred
        assert h.state.run_index == 2 and h.state.step == 1 and h.state.calls == 2 and h.state.timestep == 0.5
        seeds = {g.seed for g in m.log}
    assert len(seeds) == 1 and None not in seeds  # the same noise in both runs


def test_a_method_reading_the_step_sees_it_at_once():
    model, kw = tm.tiny_flux(), tm.flux_inputs(grid=(3, 5))
    m = EagerStepRecorder()
    with visattn.apply(model, m):
        for t in TS:
            _out(model, dict(kw, timestep=torch.tensor([t])))
    assert m.steps == [s for s in STEPS for _ in range(2)]


def test_consistent_on_flux_reads_the_step_eagerly():
    model, kw = tm.tiny_flux(), tm.flux_inputs(grid=(3, 5), batch=2)
    m = Consistent(sample_rate=1.0, layers="all", gate=(1.0, 1.0), first_step_plain=False)
    seen = []
    with visattn.apply(model, m, layers=lambda n: n.startswith("transformer_blocks.0."), cfg_chunks=1) as h:
        for t in TS:
            _out(model, dict(kw, timestep=torch.tensor([t, t])))
            assert not h.state._deferred  # Consistent resets per run: no deferral
            seen.append(h.geometries()["transformer_blocks.0.attn"].__dict__["step"])
    assert seen == STEPS and m.stats["csa_calls"] > 0


def _replay(calls, defer: bool):
    """Drive a RunState + LayerCtx as the hook does; returns the geometries (read at the end) and the state."""
    st = RunState()
    ctx = LayerCtx("l", "self", Dense(), st)
    q = torch.zeros(2, 1, 4, 8)
    geos = []
    for kind, t, sample, *rest in calls:
        if kind == "begin":
            st.begin_run(*rest)
            continue
        if defer:
            st.denoiser_call(t, sample)
        else:
            st.on_denoiser_call(st.timestep_value(t), sample)
        geos.append(ctx.geometry(q, q))
    return geos, st


def test_deferred_bookkeeping_equals_eager_bookkeeping():
    g = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(1, 6, 4, generator=g), torch.randn(1, 6, 4, generator=g)
    pair = torch.cat([x2, x2]).to(torch.bfloat16)
    sched = torch.tensor([1000.0, 500.0])
    calls = [("call", torch.tensor([0.9]), x1), ("call", torch.tensor([0.9]), x1), ("call", torch.tensor(0.6), x1),
             ("call", torch.tensor([0.95], dtype=torch.bfloat16), x2),           # larger: a new run (bf16 step)
             ("call", torch.tensor([0.3], dtype=torch.float64), x2),
             ("begin", None, None, 2, None, sched),
             ("call", sched[0].expand(1), x1),                                   # a schedule view: read at once
             ("call", torch.tensor([0.5]), x1),                                   # deferred again
             ("call", torch.tensor([0.4, 0.4]), pair),                            # batch 2, scheduled: eager
             ("call", 7, x2), ("call", None, x2)]
    eager, st_e = _replay(calls, defer=False)
    lazy, st_l = _replay(calls, defer=True)
    fields = ("step", "timestep", "num_steps", "seed", "cfg_chunks")
    assert [[getattr(x, f) for f in fields] for x in lazy] == [[getattr(x, f) for f in fields] for x in eager]
    assert lazy == eager
    for f in ("step", "timestep", "num_steps", "seed", "run_index", "calls", "cfg_chunks"):
        assert getattr(st_l, f) == getattr(st_e, f), f


def test_deferred_calls_are_read_in_bounded_batches(monkeypatch):
    monkeypatch.setattr(vbase, "_MAX_DEFERRED", 3)
    st = RunState()
    x = torch.randn(1, 4, 2)
    for i in range(7):
        st.denoiser_call(torch.tensor([1.0 - i / 10]), x)
        assert len(st._deferred) == (i + 1) % 3
    assert st.step == 6 and st.run_index == 1


def test_pipeline_run_defers_and_keeps_schedule_values(grid_reads):
    pipe = tm.tiny_flux_pipeline()
    m = StepRecorder()
    with visattn.apply(pipe, m) as h:
        pipe(**tm.flux_pipeline_kwargs(steps=3))
        pending = len(h.state._deferred)
        ts = [float(t) for t in (pipe.scheduler.timesteps / 1000)]
        assert pending == 3
        assert [g.step for g in m.log[::2]] == [0, 1, 2] and {g.num_steps for g in m.log} == {3}
        assert [g.timestep for g in m.log[::2]] == ts
        assert {g.grid for g in m.log} == {(6, 10)} and grid_reads == [(6, 10)]  # one latent_image_ids per run
        m.log.clear()
        pipe(**tm.flux_pipeline_kwargs(steps=2))  # set_timesteps reads the previous run's calls first
        assert [g.step for g in m.log[::2]] == [0, 1] and h.state.run_index == 2
    assert grid_reads == [(6, 10)] * 2


# ----------------------------------------------------------------------------------------------- TokenGeometry
def test_deferred_token_geometry_behaves_as_a_plain_one():
    reads = []

    def src():
        reads.append(1)
        return dict(step=2, timestep=0.5, num_steps=4, seed=11)

    kw = dict(batch=1, heads=2, seq_len=15, kv_len=15, grid=(3, 5), layer="a")
    plain = TokenGeometry(step=2, timestep=0.5, num_steps=4, seed=11, **kw)
    lazy = TokenGeometry._deferred(src, **kw)
    assert lazy.grid == (3, 5) and reads == []
    assert lazy == plain and hash(lazy) == hash(plain) and repr(lazy) == repr(plain) and reads == [1]
    assert lazy.seed == 11 and reads == [1]
    for make in (lambda g: pickle.loads(pickle.dumps(g)), copy.deepcopy, copy.copy, lambda g: g.with_(layer="b")):
        g = make(TokenGeometry._deferred(src, **kw))
        assert (g.step, g.timestep, g.num_steps, g.seed) == (2, 0.5, 4, 11)
    a = TokenGeometry._deferred(src, **kw).rng(salt=1).initial_seed()
    assert a == plain.rng(salt=1).initial_seed()
    with pytest.raises(AttributeError):
        plain.nonexistent  # noqa: B018
    assert TokenGeometry(**kw).step is None and TokenGeometry(**kw).seed is None
