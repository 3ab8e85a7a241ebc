"""Edit window (ComfyUI percent convention), step lookup and the three eta zones."""

from __future__ import annotations

import comfy.model_sampling
import pytest
import torch

from agg_kernels import schedule as sc


def linear_percent(p: float) -> float:
    """A toy percent_to_sigma: 10 at percent 0, 0 at percent 1."""
    return 10.0 * (1.0 - p)


def test_edit_window_orders_high_then_low():
    assert sc.edit_window(linear_percent, 0.2, 0.6) == (pytest.approx(8.0), pytest.approx(4.0))


@pytest.mark.parametrize("start,end", [(0.5, 0.5), (0.7, 0.2), (-0.1, 0.5), (0.2, 1.5)])
def test_window_check_rejects_bad_percents(start, end):
    with pytest.raises(ValueError, match="start_percent"):
        sc.check_window(start, end)
    sc.check_window(0.0, 1.0)


def test_edit_window_with_comfyui_model_sampling():
    # The real discrete SD schedule: percent 0 maps to a huge sigma, percent 1 to 0.
    ms = comfy.model_sampling.ModelSamplingDiscrete()
    hi, lo = sc.edit_window(ms.percent_to_sigma, 0.0, 1.0)
    assert hi > 1e8 and lo == 0.0
    hi, lo = sc.edit_window(ms.percent_to_sigma, 0.4, 0.6)
    assert float(ms.sigma_max) > hi > lo > float(ms.sigma_min)
    sigmas = torch.flip(ms.sigmas, [0])[::50]
    inside = [bool(sc.in_window(s, (hi, lo))) for s in sigmas]
    # A contiguous run of steps is inside.
    first, last = inside.index(True), len(inside) - 1 - inside[::-1].index(True)
    assert all(inside[first : last + 1]) and not any(inside[:first]) and not any(inside[last + 1 :])


def test_in_window_bounds():
    w = (8.0, 4.0)
    assert sc.in_window(8.0, w) and sc.in_window(4.0, w) and sc.in_window(6.0, w)
    assert not sc.in_window(8.01, w) and not sc.in_window(3.99, w)
    # float32 values of the bounds count as the bounds.
    assert sc.in_window(torch.tensor([4.0], dtype=torch.float32) * (1 - 1e-6), w)
    # A batch sigma is judged by its first entry.
    assert sc.in_window(torch.tensor([5.0, 5.0]), w)
    # The full window includes everything down to 0.
    assert sc.in_window(0.0, sc.edit_window(linear_percent, 0.0, 1.0))


def test_step_index():
    sched = torch.tensor([14.6, 7.0, 3.0, 1.0, 0.0])
    assert sc.step_index(sched, 14.6) == 0
    assert sc.step_index(sched, torch.tensor([3.0, 3.0])) == 2
    assert sc.step_index([0.9, 0.5, 0.0], 0.5) == 1
    assert sc.step_index(sched, 5.0) is None
    assert sc.step_index(sched, 0.0) is None  # the end of the run starts no step


def test_zone_eta_three_zones():
    etas = [sc.zone_eta(i, 9, 0.1, 0.2, 0.3, 1 / 3, 2 / 3) for i in range(9)]
    assert etas == [0.1] * 3 + [0.2] * 3 + [0.3] * 3


def test_zone_eta_reference_split():
    # 60 steps: the first 19 use eta_edit, the last third eta_boost.
    etas = [sc.zone_eta(i, sc.REFERENCE_STEPS, 0.5, 0.0, 1.0) for i in range(sc.REFERENCE_STEPS)]
    assert etas.count(0.5) == sc.REFERENCE_GUIDED_STEPS == 19
    assert etas.count(1.0) == 20 and etas[-1] == 1.0 and etas[19] == 0.0


def test_zone_eta_edge_zones():
    # Empty zones are allowed; an empty edit zone starts in the middle zone.
    assert sc.zone_eta(0, 10, 0.1, 0.2, 0.3, 0.0, 0.5) == 0.2
    assert sc.zone_eta(9, 10, 0.1, 0.2, 0.3, 1.0, 1.0) == 0.1
    assert sc.zone_eta(5, 10, 0.1, 0.2, 0.3, 0.5, 0.5) == 0.3


@pytest.mark.parametrize("edit_end,boost_start", [(0.6, 0.4), (-0.1, 0.5), (0.5, 1.2)])
def test_zone_bounds_are_checked(edit_end, boost_start):
    with pytest.raises(ValueError, match="edit_end"):
        sc.check_zones(edit_end, boost_start)
    sc.check_zones(boost_start=1.0, edit_end=0.0)


def test_paper_defaults():
    assert sc.DEFAULT_ETA_EDIT == 0.0 and sc.DEFAULT_ETA == 0.0 and sc.DEFAULT_ETA_BOOST == 1.0
    assert 0.3 < sc.DEFAULT_EDIT_END < 1 / 3 + 1e-9 and sc.DEFAULT_BOOST_START == pytest.approx(2 / 3)
    assert sc.REFERENCE_START_PERCENT == pytest.approx(0.4)
    assert sc.REFERENCE_END_PERCENT == pytest.approx(0.4 + 0.6 * 19 / 60)


def test_window_edit_end_covers_exactly_the_guided_steps():
    from agg_kernels.schedule import in_window, window_edit_end

    sigmas = [10.0, 6.0, 3.0, 1.0, 0.5, 0.0]
    assert window_edit_end(sigmas, 3.0) == 3 / 5  # steps from 10, 6 and 3 are guided
    assert window_edit_end(sigmas, 2.0) == 3 / 5
    assert window_edit_end(sigmas, 0.5 * (1 + 5e-5)) == 1.0  # float32 schedules: the bound's tolerance
    assert window_edit_end(sigmas, 100.0) == 0.0
    guided = [i for i in range(5) if in_window(sigmas[i], (10.0, 3.0))]
    assert len(guided) == window_edit_end(sigmas, 3.0) * 5
