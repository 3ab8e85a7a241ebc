"""Manifold gradients on an exact mixture denoiser: autograd is the true J^T v, finite differences match it."""

from __future__ import annotations

import pytest
import torch
from agg_testing.analytic import gaussian, gaussian_posterior_gain, mixture

from agg_kernels.coordinates import expand_sigma
from agg_kernels.manifold import (
    FD_MAX_ERROR,
    FD_NOISE_REASON,
    FD_REL_STEP,
    FD_REL_STEP_HALF,
    covariance_operator,
    fd_is_noise,
    fd_rel_step_for,
    fd_step_size,
    grad_enabled,
    jvp_central_difference,
    jvp_finite_difference,
    reduced_precision,
)
from agg_kernels.strength import covariance_scale, posterior_variance


def covariance_product(mode, v, x, d, s, family, denoise=None, dtype=torch.float32):
    """Cov[x0 | x] v by the kernel's operator for `mode` (d: the denoiser's value at x)."""
    return covariance_operator(mode, x, s, family, denoise, base=d, dtype=dtype)(v).value


def manifold_gradient(mode, v, x, d, s, denoise=None, family="eps"):
    """J v (J^T v for autograd): the covariance product without its sigma^2 / alpha scale."""
    return covariance_product(mode, v, x, d, s, family, denoise) / covariance_scale(expand_sigma(s, v), family)

FAMILIES = ("eps", "v_prediction", "const")
SIGMAS = {"eps": [14.6, 4.0, 1.0, 0.3, 0.08], "const": [0.95, 0.7, 0.4, 0.15, 0.05]}
SIGMAS["v_prediction"] = SIGMAS["eps"]
SHAPE = (4, 2, 4, 4)
MIN_COS: dict[str, float] = {}
RATIO: dict[str, tuple[float, float]] = {f: (1.0, 1.0) for f in FAMILIES}


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    print("\nmin cosine(finite_difference, autograd) per family:")
    for k, v in sorted(MIN_COS.items()):
        print(f"  {k}: {v:.6f}  |fd| / |autograd| in [{RATIO[k][0]:.3f}, {RATIO[k][1]:.3f}]")


def data():
    g = torch.Generator().manual_seed(0)
    return mixture(torch.randn(3, *SHAPE[1:], generator=g), [0.3, 0.6, 1.0], [0.4, 0.4, 0.2])


def noisy(mix, sigma, family, seed=1):
    g = torch.Generator().manual_seed(seed)
    return mix.noised(mix.sample(SHAPE[0], g)[0], sigma, family, g)


def cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten(1).double(), b.flatten(1).double(), dim=1)


@pytest.mark.parametrize("family", FAMILIES)
def test_finite_difference_matches_autograd(family):
    mix = data()
    goal = torch.randn(SHAPE[1:], generator=torch.Generator().manual_seed(5))
    for sigma in SIGMAS[family]:
        x = noisy(mix, sigma, family)
        s = torch.full((SHAPE[0],), sigma)

        def denoise(z, s=s):
            return mix.denoise(z, s, family)

        d = denoise(x)
        for v in (d - goal, torch.randn(SHAPE, generator=torch.Generator().manual_seed(9))):
            ag = manifold_gradient("autograd", v, x, d, s, denoise)
            fd = manifold_gradient("finite_difference", v, x, d, s, denoise)
            cos = cosine(fd, ag).min().item()
            MIN_COS[family] = min(MIN_COS.get(family, 1.0), cos)
            assert cos >= 0.999, (family, sigma, cos)
            # Magnitude: a forward difference has O(h) truncation error; where the posterior is split between
            # modes (responsibilities far from 0 / 1) J varies over the probe and the norm is off by a few %.
            ratio = fd.flatten(1).norm(dim=1) / ag.flatten(1).norm(dim=1)
            RATIO[family] = (min(RATIO[family][0], ratio.min().item()), max(RATIO[family][1], ratio.max().item()))
            assert ((ratio > 0.9) & (ratio < 1.1)).all(), (family, sigma, ratio)


@pytest.mark.parametrize("family", FAMILIES)
def test_autograd_is_the_exact_vjp_and_jacobian_is_symmetric(family):
    mix = data()
    sigma = SIGMAS[family][2]
    x = noisy(mix, sigma, family)[:1]
    s = torch.full((1,), sigma)

    def flat(z):
        return mix.denoise(z.reshape(x.shape), s, family).flatten()

    with grad_enabled():
        jac = torch.autograd.functional.jacobian(flat, x.flatten().double().float())
    # The Tweedie Jacobian alpha Cov[x0|x] / sigma^2 is symmetric: J^T v = J v, the finite-difference premise.
    assert (jac - jac.T).abs().max().item() < 1e-5
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    ag = manifold_gradient("autograd", v, x, mix.denoise(x, s, family), s, lambda z: mix.denoise(z, s, family))
    assert (ag.flatten() - jac.T @ v.flatten()).abs().max().item() < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_gaussian_jacobian_closed_form(family):
    # Gaussian data: D = mu + gain (x - alpha mu) with gain = alpha s^2 / (alpha^2 s^2 + sigma^2).
    mean = torch.randn(SHAPE[1:], generator=torch.Generator().manual_seed(4))
    data_g = gaussian(mean, 0.7)
    for sigma in SIGMAS[family]:
        x = noisy(data_g, sigma, family)
        s = torch.full((SHAPE[0],), sigma)
        v = torch.randn(SHAPE, generator=torch.Generator().manual_seed(6))
        for mode in ("autograd", "finite_difference"):
            g = manifold_gradient(mode, v, x, data_g.denoise(x, s, family), s, lambda z, s=s: data_g.denoise(z, s, family))
            expected = gaussian_posterior_gain(sigma, 0.7, family) * v
            assert (g - expected).abs().max().item() < 1e-4 * max(1.0, v.abs().max().item()), (mode, sigma)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["autograd", "finite_difference"])
def test_covariance_product_is_the_posterior_covariance(family, mode):
    # sigma^2 / alpha * J v = Cov[x0 | x] v; for Gaussian data Cov = s^2 sigma^2 / (alpha^2 s^2 + sigma^2).
    data_g = gaussian(torch.zeros(SHAPE[1:]), 0.5)
    sigma = SIGMAS[family][1]
    x = noisy(data_g, sigma, family)
    s = torch.full((SHAPE[0],), sigma)
    d = data_g.denoise(x, s, family)
    v = torch.ones(SHAPE)
    out = covariance_product(mode, v, x, d, s, family, lambda z: data_g.denoise(z, s, family))
    a = 1 - sigma if family == "const" else 1.0
    cov = 0.25 * sigma**2 / (a**2 * 0.25 + sigma**2)
    assert (out - cov * v).abs().max().item() < 1e-3 * cov


@pytest.mark.parametrize("family", FAMILIES)
def test_none_is_the_unit_variance_covariance(family):
    # Unit-variance Gaussian data: the model's own covariance equals the prior's sigma^2 / (alpha^2 + sigma^2),
    # the scale `none` uses; the old sigma^2 / alpha overshoots it by (alpha^2 + sigma^2) / alpha.
    data_g = gaussian(torch.zeros(SHAPE[1:]), 1.0)
    v = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    for sigma in SIGMAS[family]:
        x = noisy(data_g, sigma, family)
        s = torch.full((SHAPE[0],), sigma)
        exact = covariance_product("autograd", v, x, data_g.denoise(x, s, family), s, family,
                                   lambda z, s=s: data_g.denoise(z, s, family))
        none = covariance_product("none", v, x, None, s, family)
        assert torch.allclose(none, exact, rtol=1e-4, atol=1e-6), (family, sigma)
        assert float(none.abs().max()) <= float(v.abs().max()) * float(posterior_variance(sigma, family)) + 1e-6


def test_none_mode_and_errors():
    v = torch.randn(2, 3)
    none = covariance_operator("none", v, 1.0, "eps")(v)
    assert torch.equal(none.value, posterior_variance(1.0, "eps") * v) and none.mode == "none" and none.noise is None
    with pytest.raises(ValueError, match="needs a denoiser"):
        covariance_operator("autograd", v, 1.0, "eps")
    with pytest.raises(ValueError, match="unknown manifold mode"):
        covariance_operator("exact", v, 1.0, "eps", denoise=lambda z: z)


def test_the_operator_is_decided_by_the_compute_dtype():
    # float32: one one-sided probe of FD_REL_STEP; half precision: two probes of FD_REL_STEP_HALF, with an error check
    calls = []

    def denoise(z):
        calls.append(z.clone())
        return 0.5 * z

    x, v = torch.ones(1, 4), torch.ones(1, 4)
    for dtype, probes, rel in ((torch.float32, 1, FD_REL_STEP), (torch.bfloat16, 2, FD_REL_STEP_HALF)):
        calls.clear()
        out = covariance_operator("finite_difference", x, 2.0, "eps", denoise, base=0.5 * x, dtype=dtype)(v)
        assert len(calls) == probes and out.mode == "finite_difference"
        assert torch.allclose((calls[0] - x).abs(), torch.full_like(x, rel * 2.0))
        assert (out.noise is None) == (probes == 1)
        assert torch.allclose(out.value, 4.0 * 0.5 * v)


def test_fd_probe_size_is_relative_to_sigma():
    x = torch.zeros(2, 8)
    v = torch.randn(2, 8, generator=torch.Generator().manual_seed(0)) * torch.tensor([[1.0], [100.0]])
    sigma = torch.tensor([2.0, 0.1])
    h = fd_step_size(x, v, sigma, 0.02)
    rms = (h * v).pow(2).mean(1).sqrt()
    assert torch.allclose(rms, 0.02 * sigma, rtol=1e-5)


def test_works_under_inference_mode():
    # ComfyUI samples under inference_mode: the gradient path must open its own grad context.
    mix = data()
    x = noisy(mix, 1.0, "eps")
    s = torch.ones(SHAPE[0])
    with torch.inference_mode():
        d = mix.denoise(x, s, "eps")
        g = manifold_gradient("autograd", d, x, d, s, lambda z: mix.denoise(z, s, "eps"))
    assert torch.isfinite(g).all() and g.abs().sum() > 0


# -- half precision: the probe's size by compute dtype, its run-time error estimate, the fallback ------------------

HALF_SHAPE = (4, 4, 16, 16)  # enough elements per sample for the norms in the error estimate to settle


def test_probe_size_follows_the_compute_dtype():
    assert fd_rel_step_for(torch.float32) == FD_REL_STEP and fd_rel_step_for(torch.float64) == FD_REL_STEP
    for dtype in (torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):
        assert reduced_precision(dtype) and fd_rel_step_for(dtype) == FD_REL_STEP_HALF, dtype
    assert not reduced_precision(torch.float32) and not reduced_precision(torch.int8)


@pytest.mark.parametrize("noise", [0.002, 0.01, 0.05, 0.2])
def test_error_estimate_measures_known_noise(noise):
    # A linear denoiser D(z) = 0.3 z plus fresh Gaussian noise of RMS `noise` per call: the estimate from the two
    # one-sided differences tracks the central difference's true error within 25 % up to an error of 1, and says
    # more than 1 beyond (there |central| is mostly noise). Measured: ratio 0.90 .. 1.03 for true errors 0.05 .. 1.2.
    g = torch.Generator().manual_seed(int(noise * 1e4))
    x = torch.randn(HALF_SHAPE, generator=g)
    v = torch.randn(HALF_SHAPE, generator=g)

    def denoise(z):
        return 0.3 * z + noise * torch.randn(z.shape, generator=g)

    jv, estimate = jvp_central_difference(denoise, x, denoise(x), v, 1.0, 0.1)
    true = (jv - 0.3 * v).flatten(1).norm(dim=1) / (0.3 * v).flatten(1).norm(dim=1)
    ratio = estimate / true
    print(f"noise {noise}: true error {true.mean():.3f}, estimate / true in [{ratio.min():.3f}, {ratio.max():.3f}]")
    assert torch.where(true < 1, (ratio > 0.75) & (ratio < 1.25), estimate > 1).all(), (true, estimate)


def test_error_estimate_of_an_exact_denoiser_is_small_at_the_half_precision_probe():
    # No rounding: only curvature enters, and the estimate stays far below the fallback threshold (no false
    # fallback). Measured: at most 0.073 over the mixture's sigmas and families.
    mix = data()
    worst = 0.0
    for family in FAMILIES:
        for sigma in SIGMAS[family]:
            x = noisy(mix, sigma, family)
            s = torch.full((SHAPE[0],), sigma)
            v = torch.randn(SHAPE, generator=torch.Generator().manual_seed(9))
            d = mix.denoise(x, s, family)
            _, estimate = jvp_central_difference(lambda z, s=s, f=family: mix.denoise(z, s, f), x, d, v, s)
            worst = max(worst, float(estimate.max()))
    print(f"largest error estimate of the exact mixture denoiser: {worst:.4f}")
    assert worst < FD_MAX_ERROR / 3


def rounded(mix, sigma, family, dtype):
    """The mixture's denoiser as a model computing in `dtype` returns it: its output (x - D) / sigma (eps for
    eps models, the flow velocity for const ones) rounded to dtype, D = x - sigma * output in float32."""
    s = torch.full((HALF_SHAPE[0],), sigma)

    def denoise(z):
        out = ((z - mix.denoise(z, s, family)) / sigma).to(dtype).float()
        return z - sigma * out

    return denoise


# (family, sigma, dtype): min over samples of cos(one-sided probe of FD_REL_STEP_HALF, exact) as measured, where the
# old one-sided probe was far off on some samples; the check must send some of them to the prior covariance.
NOISY_CASES = {("eps", 14.6, torch.float16): 0.34, ("eps", 14.6, torch.bfloat16): 0.05,
               ("eps", 8.0, torch.bfloat16): 0.02, ("const", 0.9, torch.bfloat16): 0.31}


@pytest.mark.parametrize("family", ["eps", "const"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_step_is_close_to_exact_or_falls_back(family, dtype):
    """A denoiser that rounds its output to fp16 / bf16 (what a half-precision model does at least): at every
    sigma, each sample's two-sided covariance product is within cos 0.9 of the exact one, or the estimate
    flags it as rounding noise. Measured, min cos of the kept samples: fp16 eps 0.967 (sigma 4), fp16 const
    0.984 (sigma 0.9), bf16 eps 0.982 (sigma 1.2), bf16 const 0.952 (sigma 0.7); flagged samples of 4: fp16 eps
    1 at sigma 14.6, 3 at 8; bf16 eps 2 at 14.6, all at 8 and 4; bf16 const 3 at 0.9; no others."""
    g = torch.Generator().manual_seed(0)
    mix = mixture(torch.randn(3, *HALF_SHAPE[1:], generator=g), [0.3, 0.6, 1.0], [0.4, 0.4, 0.2])
    sigmas = {"eps": [14.6, 8.0, 4.0, 1.2], "const": [0.98, 0.9, 0.7, 0.5]}[family]
    for sigma in sigmas:
        gs = torch.Generator().manual_seed(1)
        x = mix.noised(mix.sample(HALF_SHAPE[0], gs)[0], sigma, family, gs)
        s = torch.full((HALF_SHAPE[0],), sigma)
        v = torch.randn(HALF_SHAPE, generator=torch.Generator().manual_seed(9))
        exact = covariance_product("autograd", v, x, None, s, family, lambda z, s=s: mix.denoise(z, s, family))
        half = rounded(mix, sigma, family, dtype)
        d = half(x)
        jv, error = jvp_central_difference(half, x, d, v, s, fd_rel_step_for(dtype))
        step = covariance_scale(expand_sigma(s, v), family) * jv
        noise = fd_is_noise(error)
        assert torch.equal(covariance_operator("finite_difference", x, s, family, half, base=d, dtype=dtype)(v).noise, noise)
        cos = cosine(step, exact)
        kept = cos[~noise]
        print(f"{family} {dtype} sigma {sigma}: flagged {int(noise.sum())} of {len(noise)}, "
              f"min cos of the kept {float(kept.min()) if len(kept) else float('nan'):.3f}")
        assert (noise | (cos >= 0.9)).all(), (family, sigma, dtype, cos, error)
        if (family, sigma, dtype) in NOISY_CASES:
            one_sided = covariance_scale(expand_sigma(s, v), family) * jvp_finite_difference(half, x, d, v, s, FD_REL_STEP_HALF)
            assert cosine(one_sided, exact).min() < 0.5  # the old probe's step: mostly noise
            assert noise.any(), (family, sigma, dtype, error)


def test_guided_step_falls_back_to_the_prior_where_the_probe_is_rounding_noise():
    from agg_kernels.guidance import guided_delta
    from agg_kernels.objective import LossContext, Term

    g = torch.Generator().manual_seed(0)
    mix = mixture(torch.randn(3, *HALF_SHAPE[1:], generator=g), [0.3, 0.6, 1.0], [0.4, 0.4, 0.2])
    goal = torch.randn(HALF_SHAPE[1:], generator=g)
    loss = (Term("pull", lambda x0, ctx: (x0 - goal).pow(2).flatten(1).mean(1), 0.05),)
    for sigma, dtype, falls_back in ((14.6, torch.bfloat16, True), (14.6, torch.float32, False)):
        gs = torch.Generator().manual_seed(1)
        x = mix.noised(mix.sample(HALF_SHAPE[0], gs)[0], sigma, "eps", gs)
        s = torch.full((HALF_SHAPE[0],), sigma)
        model = rounded(mix, sigma, "eps", dtype)
        d = model(x)
        ctx = LossContext(sigma=s, x=x, family="eps")
        res = guided_delta(loss, d, ctx, covariance_operator("finite_difference", x, s, "eps", model, base=d, dtype=dtype),
                           dds_steps=0)
        prior = guided_delta(loss, d, ctx, None, dds_steps=0)
        if falls_back:
            # per sample: the flagged ones take the prior's step, the others keep their own; the report counts them
            assert res.fallback and FD_NOISE_REASON in res.fallback and "prior covariance" in res.fallback
            same = [torch.allclose(a, b, atol=1e-7, rtol=1e-5) for a, b in zip(res.delta, prior.delta, strict=True)]
            assert 0 < sum(same) and f"on {sum(same)} of {HALF_SHAPE[0]} samples" in res.fallback, (same, res.fallback)
        else:
            assert res.fallback is None, res.fallback
            assert not torch.allclose(res.delta, prior.delta, atol=1e-7, rtol=1e-3)
