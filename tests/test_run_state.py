"""RunState bookkeeping without device readbacks in pipeline runs: timesteps read from the schedule's host copy,
CFG detected once per run and batch shape (adapters/base.py)."""
from __future__ import annotations

import torch

from visattn.adapters.base import RunState


def _schedule():
    return torch.tensor([999.0, 799.0, 599.0, 399.0, 199.0])


def test_timestep_views_of_the_schedule_are_read_from_the_host_copy():
    ts = _schedule()
    st = RunState()
    st.begin_run(5, True, ts)
    ts[1] = -1.0  # changed after set_timesteps: only a readback of the tensor would see it
    assert st.timestep_value(ts[1]) == 799.0                      # a view of the schedule
    assert st.timestep_value(ts[1].expand(4)) == 799.0            # expanded for the batch (SD3-style)
    assert st.timestep_value(ts[2:][1]) == 399.0                  # img2img slices the schedule
    assert st.timestep_value(ts[1].clone()) == -1.0               # a copy: read from the tensor itself
    assert st.timestep_value(ts[1].double()) == -1.0              # another dtype: a copy too
    assert st.timestep_value(500) == 500.0 and st.timestep_value(None) is None


def test_without_a_schedule_the_tensor_is_read():
    st = RunState()
    assert st.timestep_value(torch.tensor([250.0, 250.0])) == 250.0
    assert st.timestep_value(torch.tensor(7)) == 7.0


def _pair(seed: int) -> torch.Tensor:
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
    return torch.cat([x, x])


def test_cfg_detected_once_per_pipeline_run_and_batch_shape():
    st = RunState()
    st.begin_run(3, True, _schedule())
    st.on_denoiser_call(999.0, _pair(0))
    assert st.cfg_chunks == 2
    st.on_denoiser_call(799.0, torch.randn(2, 4, 8, 8))   # same run and shape: the detection is kept
    assert st.cfg_chunks == 2 and st.step == 1
    st.on_denoiser_call(599.0, torch.randn(1, 4, 8, 8))   # another batch shape: detected again
    assert st.cfg_chunks == 1
    st.begin_run(3, True, _schedule())                     # a new run: detected again
    st.on_denoiser_call(999.0, torch.randn(2, 4, 8, 8))
    assert st.cfg_chunks == 1 and st.step == 0


def test_direct_calls_detect_cfg_on_every_call():
    st = RunState()  # no pipeline: no begin_run
    st.on_denoiser_call(999.0, _pair(0))
    assert st.cfg_chunks == 2
    st.on_denoiser_call(799.0, torch.randn(2, 4, 8, 8))
    assert st.cfg_chunks == 1
    st.begin_run(3, True, _schedule())
    st.on_denoiser_call(999.0, _pair(1))
    st.on_denoiser_call(1999.0, torch.randn(2, 4, 8, 8))  # larger timestep, no begin_run: a direct run again
    assert st.cfg_chunks == 1 and st.step == 0 and st._schedule_ref is None
    st.on_denoiser_call(999.0, _pair(2))
    assert st.cfg_chunks == 2                               # per call again
