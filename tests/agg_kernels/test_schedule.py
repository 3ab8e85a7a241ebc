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
    sigmas = [float(s) for s in torch.flip(ms.sigmas, [0])[::50]] + [0.0]
    inside = [sc.step_rate(s, sn, (hi, lo), "eps") > 0 for s, sn in zip(sigmas[:-1], sigmas[1:], strict=True)]
    # A contiguous run of steps is inside.
    first, last = inside.index(True), len(inside) - 1 - inside[::-1].index(True)
    assert all(inside[first : last + 1]) and not any(inside[:first]) and not any(inside[last + 1 :])


def test_schedule_time_is_the_noise_share_of_the_variance():
    assert sc.schedule_time(2.0, "eps") == pytest.approx(4 / 5)  # 1 - alpha_bar of the VP schedule
    assert sc.schedule_time(0.25, "const") == pytest.approx(0.0625 / (0.5625 + 0.0625))
    assert sc.schedule_time(0.0, "eps") == 0.0 and sc.schedule_time(0.0, "const") == 0.0
    assert sc.schedule_time(1.0, "const") == 1.0  # pure noise: alpha 0
    assert 0.999 < sc.schedule_time(1e3, "eps") < 1.0
    assert sc.schedule_time(-2.0, "eps") == 0.0  # no negative noise
    assert sc.step_rate(2.0, 1.0, (0.0, 0.0), "eps") == 0.0  # an empty window guides nothing


def test_step_rate_is_the_steps_schedule_time_inside_the_window():
    w = (8.0, 4.0)
    t = lambda s: s * s / (1 + s * s)  # noqa: E731
    ref = sc.REFERENCE_STEP_TIME
    assert sc.step_rate(8.0, 6.0, w, "eps") == pytest.approx((t(8) - t(6)) / ref)  # wholly inside
    assert sc.step_rate(10.0, 6.0, w, "eps") == pytest.approx((t(8) - t(6)) / ref)  # straddles the top
    assert sc.step_rate(5.0, 2.0, w, "eps") == pytest.approx((t(5) - t(4)) / ref)  # straddles the bottom
    assert sc.step_rate(16.0, 2.0, w, "eps") == pytest.approx((t(8) - t(4)) / ref)  # spans the whole window
    assert sc.step_rate(4.0, 2.0, w, "eps") == 0.0  # starts at the lower end: below the window
    assert sc.step_rate(4.0 * (1 + 1e-5), 2.0, w, "eps") == 0.0  # float32 rounding of that start
    assert sc.step_rate(12.0, 8.0, w, "eps") == 0.0  # ends at the upper end: above it
    # the whole schedule, pure noise to the clean image, is 1 / REFERENCE_STEP_TIME reference steps
    assert sc.step_rate(1.0, 0.0, (1.0, 0.0), "const") == pytest.approx(1 / ref)
    assert sc.step_rate(0.1, 0.0, (1.0, 0.0), "eps") == pytest.approx(t(0.1) / ref)  # a final step to sigma 0


@pytest.mark.parametrize("family", ["eps", "const"])
@pytest.mark.parametrize("scheduler", ["normal", "karras", "sgm_uniform"])
def test_a_run_is_guided_for_the_schedule_time_it_shares_with_the_window(family, scheduler):
    from agg_testing.analytic import comfy_sigmas, comfy_window

    window = comfy_window(family, 0.4, sc.REFERENCE_END_PERCENT)
    length = (sc.schedule_time(window[0], family) - sc.schedule_time(window[1], family)) / sc.REFERENCE_STEP_TIME
    for steps in (4, 8, 20, 30, 60):
        sigmas = [float(s) for s in comfy_sigmas(family, steps, 0.6, scheduler)]
        rates = [sc.step_rate(s, sn, window, family) for s, sn in zip(sigmas[:-1], sigmas[1:], strict=True)]
        # the whole overlap of the run's sigmas with the window, however the steps cut it
        top = sc.schedule_time(min(sigmas[0], window[0]), family)
        shared = max(top - sc.schedule_time(window[1], family), 0.0) / sc.REFERENCE_STEP_TIME
        assert sum(rates) == pytest.approx(shared, rel=1e-4, abs=2 * sc.MIN_STEP_RATE), (steps, sigmas)
        if scheduler == "normal" and steps >= 20:
            # these runs start within a step of the window's top: about the whole window
            assert sum(rates) == pytest.approx(length, rel=0.05), steps


def test_step_index():
    sched = torch.tensor([14.6, 7.0, 3.0, 1.0, 0.0])
    assert sc.step_index(sched, 14.6) == 0
    assert sc.step_index(sched, torch.tensor([3.0, 3.0])) == 2
    assert sc.step_index([0.9, 0.5, 0.0], 0.5) == 1
    assert sc.step_index(sched, 5.0) is None
    assert sc.step_index(sched, 0.0) is None  # the end of the run starts no step


def test_zone_eta_three_zones():
    etas = [sc.zone_eta(i, 9, sc.Zones(0.1, 0.2, 0.3, 1 / 3, 2 / 3)) for i in range(9)]
    assert etas == [0.1] * 3 + [0.2] * 3 + [0.3] * 3


def test_zone_eta_reference_split():
    # 60 steps: the first 19 use eta_edit, the last third eta_boost.
    etas = [sc.zone_eta(i, sc.REFERENCE_STEPS, sc.Zones(0.5, 0.0, 1.0)) for i in range(sc.REFERENCE_STEPS)]
    assert etas.count(0.5) == sc.REFERENCE_GUIDED_STEPS == 19
    assert etas.count(1.0) == 20 and etas[-1] == 1.0 and etas[19] == 0.0


def test_zone_eta_edge_zones():
    # Empty zones are allowed; an empty edit zone starts in the middle zone.
    assert sc.zone_eta(0, 10, sc.Zones(0.1, 0.2, 0.3, 0.0, 0.5)) == 0.2
    assert sc.zone_eta(9, 10, sc.Zones(0.1, 0.2, 0.3, 1.0, 1.0)) == 0.1
    assert sc.zone_eta(5, 10, sc.Zones(0.1, 0.2, 0.3, 0.5, 0.5)) == 0.3


@pytest.mark.parametrize("edit_end,boost_start", [(0.6, 0.4), (-0.1, 0.5), (0.5, 1.2)])
def test_zone_bounds_are_checked(edit_end, boost_start):
    with pytest.raises(ValueError, match="edit_end"):
        sc.check_zones(sc.Zones(edit_end=edit_end, boost_start=boost_start))
    sc.check_zones(sc.Zones(boost_start=1.0, edit_end=0.0))


def test_paper_defaults():
    assert sc.DEFAULT_ETA_EDIT == 0.0 and sc.DEFAULT_ETA == 0.0 and sc.DEFAULT_ETA_BOOST == 1.0
    assert 0.3 < sc.DEFAULT_EDIT_END < 1 / 3 + 1e-9 and sc.DEFAULT_BOOST_START == pytest.approx(2 / 3)
    assert sc.REFERENCE_START_PERCENT == pytest.approx(0.4)
    assert sc.REFERENCE_END_PERCENT == pytest.approx(0.4 + 0.6 * 19 / 60)


def test_window_edit_end_covers_exactly_the_guided_steps():
    from agg_kernels.schedule import step_rate, window_edit_end

    sigmas = [10.0, 6.0, 3.0, 1.0, 0.5, 0.0]
    assert window_edit_end(sigmas, 3.0, "eps") == 2 / 5  # steps from 10 and 6 are guided; the one from 3 lies below
    assert window_edit_end(sigmas, 2.0, "eps") == 3 / 5
    assert window_edit_end(sigmas, 3.0 * (1 - 5e-5), "eps") == 2 / 5  # float32 rounding of the bound: no schedule time (MIN_STEP_RATE)
    assert window_edit_end(sigmas, 100.0, "eps") == 0.0
    for low in (3.0, 2.0, 0.7):
        guided = [i for i in range(5) if step_rate(sigmas[i], sigmas[i + 1], (10.0, low), "eps") > 0]
        assert len(guided) == window_edit_end(sigmas, low, "eps") * 5
