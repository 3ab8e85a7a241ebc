"""Would decoding at the resolution a loss looks at keep its guidance? Measured on the trained test model.

    python -m pytest tests/bench/reduced_decode.py -s        # about 5 min; prints the figures

The idea: CLIP looks at cut-outs of its input size (32 px for the tiny test CLIP, 224 for real ones) and Color
Loss at channel statistics, so the image losses could decode a latent shrunk (antialiased bilinear) until
the image's shorter side is 2 x the CLIP input (Color Loss: 256 px), with the gradient reaching the full
latent through the shrink's adjoint. This measures, with the loss nodes decoding through the checkpoint's
VAE (the trained decoder) on a photo:
  - per guided noise level of Apply AGG's default window (20 steps, denoise 0.6): the cosine between the
    loss's gradient w.r.t. the clean estimate through the shrunk decode and through the full decode, and
    between the guided steps (finite-difference manifold) they give; beside it the cosine between two full
    decodes' gradients with different cut-out seeds (the loss's own augmentation noise);
  - whole KSampler runs: the CLIP judge's move of the result along the text direction (probes.ClipJudge:
    the whole image at the CLIP's input size), shrunk against full decode;
  - where the disagreement comes from: the same cosine for image gradients that need no CLIP at all, random
    fields at the CLIP's input size, white or band-limited to a quarter of it (far smoother than the random
    CLIP's), pulled back through the trained decoder whole and through a shrunk latent;
  - the decoder's own lower-resolution path instead: the full latent through the decoder with its last
    upsampling layers left out (its last stages run at a half or a quarter of the image's side), the same
    image gradients pulled back, and the convolutions' multiply-adds it saves.
The pack does not shrink: see docs/PERFORMANCE.md ("Decoding at reduced resolution") for what this printed.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from agg_testing import trained as T
from agg_testing.graphs import Graph
from agg_testing.probes import ClipJudge, judged_clip_move, pack_module

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decoder import conv_macs, without_last_upsamplings  # noqa: E402  (tests/bench/decoder.py)

STEPS = 20
DENOISE = 0.6
PHOTO = "astronaut.png"
CLIP_FACTOR = 2  # the shrunk decode's shorter side: this many CLIP inputs
COLOR_SIDE = 256


def latent_size(hw: tuple[int, int], ratio: int, need: int) -> tuple[int, int]:
    h, w = hw
    k = need / (ratio * min(h, w))
    return (h, w) if k >= 1 else (max(1, round(h * k)), max(1, round(w * k)))


def shrunk(decode, need: int):
    def decode_small(x0: torch.Tensor) -> torch.Tensor:
        size = latent_size(tuple(x0.shape[-2:]), 8, need)
        small = x0 if size == tuple(x0.shape[-2:]) else F.interpolate(x0, size=size, mode="bilinear",
                                                                     align_corners=False, antialias=True)
        return decode(small)

    return decode_small


@contextlib.contextmanager
def shrinking(monkeypatch, need: int):
    """The loss nodes built inside decode the latent shrunk to `need` px (their decoders wrapped)."""
    losses = pack_module("nodes.losses")
    make = losses.make_decoder
    with monkeypatch.context() as m:
        m.setattr(losses, "make_decoder", lambda *a, **k: shrunk(make(*a, **k), need))
        yield


def photo(size: int) -> torch.Tensor:
    from PIL import Image

    arr = np.round(T.load_photo(PHOTO) * 255).astype(np.uint8)
    img = Image.fromarray(arr).resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255)[None]


def graph(session, agg_models, size: int, weight: float | None) -> Graph:
    from PIL import Image

    name = f"agg_reduced_{size}.png"
    Image.fromarray(np.round(photo(size)[0].numpy() * 255).astype(np.uint8)).save(session.dirs["input"] / name)
    return T.clip_img2img(agg_models, name, weight=weight, steps=STEPS, denoise=DENOISE)


def result(session, g: Graph):
    r = session.run(g.prompt, fresh=True)  # fresh: the loss node runs again (under the patch or not)
    assert r.ok, r.error_text()
    return r


@pytest.fixture(scope="module")
def parts(comfy, agg_models):
    T.link_trained(agg_models.root)
    g = graph(comfy, agg_models, 64, 0.1)
    r = result(comfy, g)
    return r.output(g["ckpt"].id), r.output(g["ckpt"].id, index=2), r.output(g["clip"].id)




def per_sigma(parts, loss, image: torch.Tensor, term: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(the term's gradient, the guided step) at each window noise level of the noised photo latent."""
    patcher, vae, _ = parts
    dds, guidance = pack_module("agg_kernels.dds"), pack_module("agg_kernels.guidance")
    covariance_operator = pack_module("agg_kernels.manifold").covariance_operator
    model = patcher.model

    def visit(built, x, d, ctx):
        sigma = float(ctx.sigma[0])
        grad = dds.term_gradients(built, d, ctx)[1][term]
        cov = covariance_operator("finite_difference", x, ctx.sigma, ctx.family,
                                  lambda xp: T.denoise(model, xp.float(), sigma).float(), base=d)
        return grad, guidance.guided_delta(built, d, ctx, cov).delta

    pairs = T.at_window_sigmas(patcher, vae, image, loss, visit, STEPS, DENOISE)
    return [g for g, _ in pairs], [s for _, s in pairs]


def cosines(a, b) -> list[float]:
    return np.round([float(F.cosine_similarity(x.flatten(), y.flatten(), dim=0)) for x, y in zip(a, b, strict=True)],
                    3).tolist()


@pytest.mark.parametrize("size", [128, 256])
def test_clip_direction(parts, comfy, agg_models, monkeypatch, size):
    _, vae, clip = parts
    need = CLIP_FACTOR * clip.image_size
    losses = pack_module("nodes.losses")
    inputs = dict(clip=clip, vae=vae, source_text="a photo", target_text="a watercolor painting", weight=0.1,
                  decoder="vae", cutouts=8, seed=0)
    full = per_sigma(parts, losses.AGGCLIPDirectionLoss.execute(**inputs).args[0], photo(size), "clip_direction")
    other = per_sigma(parts, losses.AGGCLIPDirectionLoss.execute(**{**inputs, "seed": 1}).args[0], photo(size),
                      "clip_direction")
    with shrinking(monkeypatch, need):
        small = per_sigma(parts, losses.AGGCLIPDirectionLoss.execute(**inputs).args[0], photo(size), "clip_direction")
    print(f"\nCLIP Direction, {size} px decoded at {need} px, per window noise level:\n"
          f"  gradient cos shrunk/full {cosines(small[0], full[0])}, other seed/full {cosines(other[0], full[0])}\n"
          f"  step cos     shrunk/full {cosines(small[1], full[1])}, other seed/full {cosines(other[1], full[1])}")
    judge = ClipJudge(agg_models.path("open_clip", agg_models.open_clip))
    base = judge.image(result(comfy, g := graph(comfy, agg_models, size, None)).output(g["decode"].id))
    for weight in (0.1, 0.3):
        g = graph(comfy, agg_models, size, weight)
        whole = judge.image(result(comfy, g).output(g["decode"].id))
        with shrinking(monkeypatch, need):
            reduced = judge.image(result(comfy, g).output(g["decode"].id))
        (gf, sf), (gr, sr) = (judged_clip_move(judge, "clip_direction", e, base) for e in (whole, reduced))
        print(f"  run at weight {weight}: judged gain (share) full {gf:.4f} ({sf:.2f}), shrunk {gr:.4f} ({sr:.2f})")


def test_color(parts, monkeypatch):
    _, vae, _ = parts
    losses = pack_module("nodes.losses")
    inputs = dict(image=photo(64).flip(-1), vae=vae, weight=0.3, decoder="vae")
    full = per_sigma(parts, losses.AGGColorLoss.execute(**inputs).args[0], photo(512), "color")
    with shrinking(monkeypatch, COLOR_SIDE):
        small = per_sigma(parts, losses.AGGColorLoss.execute(**inputs).args[0], photo(512), "color")
    print(f"\nColor, 512 px decoded at {COLOR_SIDE} px, per window noise level: gradient cos "
          f"{cosines(small[0], full[0])}, step cos {cosines(small[1], full[1])}")


def image_gradient(band: str, side: int, generator: torch.Generator) -> torch.Tensor:
    """A random image gradient at the CLIP's input size: white, or band-limited to a quarter of that size."""
    n = side if band == "white" else side // 4
    return F.interpolate(torch.randn(1, 3, n, n, generator=generator), size=(side, side), mode="bicubic",
                         align_corners=False)


def pulled_back(decode, z: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the latent gradient of <downscale(decode(z)), g>, that downscaled image): g is an image gradient at the
    size CLIP sees."""
    with torch.inference_mode(False), torch.enable_grad():
        z = z.detach().clone().requires_grad_(True)
        seen = F.interpolate(decode(z), size=tuple(g.shape[-2:]), mode="bilinear", align_corners=False, antialias=True)
        (grad,) = torch.autograd.grad((seen * g).sum(), z)
    return grad, seen.detach()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def decoder_gradients(decode, z: torch.Tensor, g: torch.Tensor, k: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The latent gradient (pulled_back) through the whole decode, and through the decode of z shrunk by k (its
    adjoint carrying the gradient back to z)."""
    small = tuple(max(1, round(n * k)) for n in z.shape[-2:])

    def shrunk(x: torch.Tensor) -> torch.Tensor:
        return decode(F.interpolate(x, size=small, mode="bilinear", align_corners=False, antialias=True))

    return pulled_back(decode, z, g)[0], pulled_back(shrunk, z, g)[0]


def test_the_decoders_jacobian_limits_a_shrunk_decode(parts):
    """A shrunk decode loses what the decoder's Jacobian does at full resolution, whatever the loss: even for
    image gradients far smoother than CLIP's, the latent gradient through a latent shrunk to half its side
    agrees with the whole decode's at cosine below 0.9 on the trained decoder (docs/PERFORMANCE.md)."""
    _, vae, clip = parts
    decoders = pack_module("nodes.decoders")
    net = decoders.decoder_copy(vae.first_stage_model, torch.device("cpu"), torch.float32)
    side = clip.image_size
    generator = torch.Generator().manual_seed(0)
    found: dict[tuple[int, str, float], float] = {}
    for size in (256, 512):
        with torch.inference_mode(False), torch.no_grad():
            z = vae.encode(photo(size)).float().clone()
        for band in ("white", "smooth"):
            g = image_gradient(band, side, generator)
            for k in (0.75, 0.5):
                found[size, band, k] = cosine(*decoder_gradients(net.decode, z, g, k))
    print("\nlatent-gradient cosine, shrunk decode vs whole decode (trained decoder, random image gradients at "
          f"the {side}-px CLIP input):")
    for (size, band, k), c in found.items():
        print(f"  {size} px, {band:<6} image gradient, latent side x{k}: {c:.3f}")
    for size in (256, 512):
        # smoother image gradients agree better, but not at half the side
        assert found[size, "smooth", 0.5] > found[size, "white", 0.5], found
        assert found[size, "smooth", 0.5] < 0.9, found
        assert found[size, "smooth", 0.75] > found[size, "smooth", 0.5], found


def test_the_decoders_last_stages_at_lower_resolution_keep_its_jacobian(parts):
    """The full latent through the trained decoder with its last upsampling left out: the early stages, where the
    decoder's content-dependent Jacobian is, run at full resolution, only the last ones at a half (or a quarter)
    of the side. Where the decoded image's side stays at least 2 x the CLIP input, the latent gradient agrees with
    the whole decode's at cosine >= 0.98, white image gradients included (a shrunk latent: 0.44-0.85 above)."""
    _, vae, clip = parts
    weights, decoders = pack_module("nodes.weights"), pack_module("nodes.decoders")
    whole = weights.gradient_copy(vae.first_stage_model, torch.device("cpu"), torch.float32, decoders.ENCODER_PARTS)
    side = clip.image_size
    generator = torch.Generator().manual_seed(0)
    print(f"\ndecoder with its last upsampling left out vs whole decode (trained decoder, {side}-px CLIP input):")
    for size in (128, 256, 512):
        with torch.inference_mode(False), torch.no_grad():
            z = vae.encode(photo(size)).float().clone()
        macs = conv_macs(whole, z)
        for band in ("white", "smooth"):
            g = image_gradient(band, side, generator)
            full, seen = pulled_back(whole.decode, z, g)
            for skip in (1, 2):
                net = without_last_upsamplings(whole, skip)
                out_side = size >> skip
                grad, small = pulled_back(net.decode, z, g)
                cos = cosine(full, grad)
                err = float((small - seen).norm() / seen.norm())
                print(f"  {size} px, {band:<6}, last {skip} upsampling(s) left out ({out_side} px decoded, "
                      f"{macs / conv_macs(net, z):.2f}x fewer conv multiply-adds): gradient cos {cos:.3f}, "
                      f"image at the CLIP's size off by {err:.3f}")
                if out_side >= 2 * side:
                    assert cos >= 0.98, (size, band, skip, cos)
