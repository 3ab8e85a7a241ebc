"""Image losses on video (Wan 2.1): CLIP Direction, Image Style and Color Loss judge `frames` latent frames of the
clip per guided step; masks per video frame or for all frames; the cost per step and the flicker guidance adds.

The model, VAE and prompts are agg_testing.wan's (see tests/nodes/test_video_model.py): a tiny random-weight Wan
2.1 T2V through UNETLoader, the Wan 2.1 VAE through VAELoader, AGGTestTextEmbedding conditionings, a moving
pattern of 4k + 1 frames VAEEncode'd to a [1, 16, k + 1, 4, 4] latent and sampled img2img by KSampler. The CLIP
is the pack's tiny open_clip fixture.
"""

from __future__ import annotations

import time

import pytest
import torch
from agg_testing import probes, wan
from agg_testing.graphs import Graph, save_latent

SEEDS = iter(range(21000, 22000))
SIZE = 32
STEPS = 3
CFG = 6.0
FRAMES = 2  # latent frames each loss judges per guided step
KINDS = ["clip_direction", "style", "color"]
TERM = {"clip_direction": "clip_direction", "style": "style", "color": "color"}


@pytest.fixture(scope="module")
def session(comfy, agg_models):
    probes.register()
    wan.register_nodes()
    wan.link_wan(agg_models.root)
    return comfy


def clip_graph(*, seed: int, pixel_frames: int = 17, steps: int = STEPS, batch: int = 1) -> Graph:
    """UNETLoader ("unet"), VAELoader ("vae"), AGGTestMovingClip ("clip") -> VAEEncode ("encode") -> KSampler
    ("sampler") -> SaveLatent, prompts as Wan graphs give them (AGGTestTextEmbedding at width 4096)."""
    g = Graph()
    unet = g.node("UNETLoader", name="unet", unet_name=wan.WAN_DIFFUSION_MODEL, weight_dtype="default")
    vae = g.node("VAELoader", name="vae", vae_name=wan.WAN_VAE)
    pos = g.node("AGGTestTextEmbedding", name="positive", text="a watercolor painting", tokens=8, width=wan.WAN_CONTEXT_DIM)
    neg = g.node("AGGTestTextEmbedding", name="negative", text="blurry", tokens=8, width=wan.WAN_CONTEXT_DIM)
    frames = g.node("AGGTestMovingClip", name="clip", frames=pixel_frames, width=SIZE, height=SIZE)
    latent = g.node("VAEEncode", name="encode", pixels=frames[0], vae=vae[0])[0]
    if batch > 1:
        latent = g.node("RepeatLatentBatch", name="batch", samples=latent, amount=batch)[0]
    ks = g.node("KSampler", name="sampler", model=unet[0], seed=seed, steps=steps, cfg=CFG, sampler_name="euler",
                scheduler="simple", positive=pos[0], negative=neg[0], latent_image=latent, denoise=0.6)
    save_latent(g, ks[0], filename_prefix="agg_wan_losses")
    return g


def add_loss(g: Graph, kind: str, agg_models, *, frames: int = FRAMES, seed: int = 3, decoder: str = "vae",
             mask: list | None = None, weight: float = 0.3) -> list:
    vae = g["vae"][0]
    extra = {"mask": mask} if mask is not None else {}
    if kind == "color":
        ref = g.node("ImageInvert", name="reference", image=g["clip"][0])
        return g.node("AGGColorLoss", name="loss", image=ref[0], vae=vae, weight=weight, decoder=decoder,
                      frames=frames, seed=seed, **extra)[0]
    clip = g.node("AGGCLIPLoader", name="open_clip", clip_name=agg_models.open_clip, architecture="auto")
    if kind == "clip_direction":
        return g.node("AGGCLIPDirectionLoss", name="loss", clip=clip[0], vae=vae, source_text="a photo",
                      target_text="a watercolor painting", weight=weight, decoder=decoder, cutouts=2,
                      range_weight=0.0, seed=seed, frames=frames, **extra)[0]
    style = g.node("ImageInvert", name="style_image", image=g["clip"][0])
    return g.node("AGGImageStyleLoss", name="loss", clip=clip[0], vae=vae, style_image=style[0], weight=weight,
                  decoder=decoder, cutouts=2, seed=seed, frames=frames, **extra)[0]


def apply(g: Graph, loss: list, manifold: str = "none", *, whole_run: bool = True) -> None:
    """Apply AGG on the sampler's model: guided over the whole run, or over the node's default window."""
    defaults = probes.node_defaults("AGGApply")
    window = {"start_percent": 0.0, "end_percent": 1.0} if whole_run else \
        {k: defaults[k] for k in ("start_percent", "end_percent")}
    agg = g.node("AGGApply", name="agg", model=g["unet"][0], loss=loss, manifold=manifold, dds_steps=1, dds_lr=0.5,
                 asymmetric=True, **window)
    g.set_input(g["sampler"], model=agg[0])


def run_guided(session, g: Graph) -> tuple[object, list[dict]]:
    with probes.guided_steps() as calls:
        r = session.run(g.prompt)
    assert r.ok, r.error_text()[:3000]
    return r, [c for c in calls if c["guided"]]


def moved_frames(delta: torch.Tensor, batch_item: int = 0) -> list[int]:
    return (delta[batch_item].abs().sum(dim=(0, 2, 3)) > 0).nonzero().flatten().tolist()


# ---------------------------------------------------------------------------------------------------
# A guided step judges `frames` frames and pulls only those (prior covariance: no spreading by the model)


@pytest.mark.parametrize("kind", KINDS)
def test_image_losses_pull_only_the_frames_they_judge(session, agg_models, kind):
    chosen_frames = probes.pack_module("agg_kernels.frames").chosen_frames
    g = clip_graph(seed=next(SEEDS))
    apply(g, add_loss(g, kind, agg_models, seed=5))
    r, steps = run_guided(session, g)
    assert len(steps) == STEPS
    seen = []
    for k, st in enumerate(steps):
        assert st["delta"].shape == (1, 16, 5, SIZE // 8, SIZE // 8)
        assert TERM[kind] in st["terms"], st["terms"]
        want = chosen_frames(5, FRAMES, 5, k)  # guided step k of the run, the node's seed 5
        assert moved_frames(st["delta"]) == want, (k, want)
        seen.append(tuple(want))
    print(f"{kind}: frames judged per guided step {seen}")
    assert len(set(seen)) > 1  # chosen afresh each step


# ---------------------------------------------------------------------------------------------------
# The cost of a guided step does not grow with the clip


def decoded_frames(session, agg_models, pixel_frames: int) -> tuple[int, list[int], float, float]:
    """(guided steps, latent frames each decode call was given, seconds guided, seconds unguided) of a CLIP
    Direction run."""
    decoders = probes.pack_module("nodes.decoders")
    original = decoders.latent_decoder
    counted: list[int] = []

    def counting(*args, **kwargs):
        decode = original(*args, **kwargs)

        def decode_counted(x0):
            counted.append(int(x0.shape[0]) * (int(x0.shape[2]) if x0.ndim == 5 else 1))
            return decode(x0)

        return decode_counted

    seed = next(SEEDS)
    plain = clip_graph(seed=seed, pixel_frames=pixel_frames)
    t0 = time.perf_counter()
    assert session.run(plain.prompt, fresh=True).ok
    t_plain = time.perf_counter() - t0
    g = clip_graph(seed=seed, pixel_frames=pixel_frames)
    apply(g, add_loss(g, "clip_direction", agg_models), manifold="none")
    decoders.latent_decoder = counting
    try:
        t0 = time.perf_counter()
        _, steps = run_guided(session, g)
        t_guided = time.perf_counter() - t0
    finally:
        decoders.latent_decoder = original
    return len(steps), counted, t_guided, t_plain


def test_cost_per_guided_step_is_flat_from_5_to_17_frames(session, agg_models):
    short = decoded_frames(session, agg_models, 17)  # 5 latent frames
    long = decoded_frames(session, agg_models, 65)  # 17 latent frames
    per_step = [sum(n) / s for s, n, _, _ in (short, long)]
    extra = [(tg - tp) / s for s, _, tg, tp in (short, long)]
    print(f"latent frames decoded per guided step (its sub-steps and evaluations together): 5 frames "
          f"{per_step[0]:.1f}, 17 frames {per_step[1]:.1f}; guidance's extra seconds per guided step "
          f"{extra[0]:.2f} / {extra[1]:.2f}")
    assert short[0] == long[0] == STEPS
    assert set(short[1]) == set(long[1]) == {FRAMES}  # every decode: `frames` frames, whatever the clip's length
    assert per_step[0] == per_step[1]


# ---------------------------------------------------------------------------------------------------
# Steadiness: guidance adds no flicker beyond a bound

# A guided clip's mean frame-to-frame change against the unguided run's from the same seed (agg_kernels.frames
# .steadiness), and each guided step's reported change of the clean estimate's (frame_change), for a strong edit:
# every step of a 6-step run guided, so guidance moves the clip by more than a third of the run's own change.
# Measured at the default 2 frames per step (python -m pytest tests/nodes/test_video_losses.py -s -k flicker):
# CLIP Direction x1.26 (steps up to x1.24), Image Style x1.27 (x1.26), Color x1.08 (x1.16); other seeds gave
# x1.19 - x1.27 for the CLIP losses. The flicker follows
# the size of the edit: judging 1 frame per step moves the clip 0.39 of the run's change and adds x1.19, judging
# all 5 moves it 1.12 and adds x1.47 (CLIP Direction); Color stays within x1.11 at 1, 2 or 5 frames. This tiny
# random model's attention hardly ties one frame to the next, so its covariance step barely carries a frame's
# pull to its neighbours: a bound for that case, not a figure for trained video models.
FLICKER_BOUND = 1.35
STEP_FLICKER_BOUND = 1.4
MIN_MOVE = 0.3
FLICKER_SEED = 21400  # fixed: the figures above are this seed's


@pytest.mark.parametrize("kind", KINDS)
def test_guidance_adds_no_flicker(session, agg_models, kind):
    steadiness = probes.pack_module("agg_kernels.frames").steadiness
    seed = FLICKER_SEED
    plain = clip_graph(seed=seed, steps=6)
    r0 = session.run(plain.prompt)
    assert r0.ok, r0.error_text()[:3000]
    base = r0.output(plain["sampler"].id)["samples"]
    g = clip_graph(seed=seed, steps=6)
    apply(g, add_loss(g, kind, agg_models, decoder="taesd"), manifold="finite_difference")
    r, steps = run_guided(session, g)
    out = r.output(g["sampler"].id)["samples"]
    source = r.output(g["encode"].id)["samples"]
    moved = float((out - base).abs().mean()) / float((base - source).abs().mean())
    ratio = float(steadiness(out, base))
    changes = [e["frame_change"] for e in r.events("agg.terms")]
    print(f"{kind}: guided clip's frame-to-frame change x{ratio:.3f} of the unguided clip's; per guided step "
          + " ".join(f"x{c:.3f}" for c in changes) + f"; guidance moved the clip {moved:.3f} of the run's change")
    assert len(changes) == len(steps) > 0 and all(c is not None for c in changes)
    assert moved > MIN_MOVE  # a strong edit
    assert ratio < FLICKER_BOUND
    assert max(changes) < STEP_FLICKER_BOUND


# ---------------------------------------------------------------------------------------------------
# Masks as videos


def moving_masks(g: Graph, pixel_frames: int = 17) -> list:
    """A MASK batch, one per pixel frame: the moving pattern's bright parts (its red channel above 0.7)."""
    clip = g.node("AGGTestMovingClip", name="mask_clip", frames=pixel_frames, width=SIZE, height=SIZE)
    red = g.node("ImageToMask", name="red", image=clip[0], channel="red")
    return g.node("ThresholdMask", name="masks", mask=red[0], value=0.7)[0]


def test_a_mask_per_frame_holds_each_frames_pull_inside_it(session, agg_models):
    mask_mod = probes.pack_module("agg_kernels.mask")
    g = clip_graph(seed=next(SEEDS))
    apply(g, add_loss(g, "color", agg_models, frames=5, mask=moving_masks(g)))
    r, steps = run_guided(session, g)
    m = r.output(g["masks"].id)
    assert m.shape[0] == 17
    region = mask_mod.video_region(m, 1, 5, (SIZE // 8, SIZE // 8))[0, 0]  # [T, h, w]
    assert region.shape[0] == 5 and not torch.equal(region[0], region[4])  # the masks differ between frames
    assert bool((region == 0).any()) and bool((region > 0).any())
    for st in steps:
        d = st["delta"][0].abs().sum(0)  # [T, h, w]
        outside = float(d[region == 0].sum())
        inside = float(d[region > 0].sum())
        assert inside > 0 and outside == 0.0, (inside, outside)


def test_one_mask_for_every_frame(session, agg_models):
    g = clip_graph(seed=next(SEEDS))
    mask = g.node("SolidMask", name="solid", value=0.0, width=SIZE, height=SIZE)
    painted = g.node("MaskComposite", name="painted", destination=mask[0],
                     source=g.node("SolidMask", name="white", value=1.0, width=SIZE // 2, height=SIZE)[0],
                     x=0, y=0, operation="add")
    apply(g, add_loss(g, "clip_direction", agg_models, frames=5, mask=painted[0]))
    _, steps = run_guided(session, g)
    for st in steps:
        d = st["delta"][0].abs().sum(0)  # [T, h, w]: the left half moves on every frame, the right half on none
        assert all(float(d[t, :, : SIZE // 16].sum()) > 0 for t in range(5))
        assert float(d[..., SIZE // 16 :].sum()) == 0.0


def test_a_mask_batch_that_fits_neither_frames_nor_clips_names_the_node(session, agg_models):
    g = clip_graph(seed=next(SEEDS), batch=2)
    apply(g, add_loss(g, "color", agg_models, mask=moving_masks(g, pixel_frames=3)))
    r = session.run(g.prompt)
    assert not r.ok
    text = r.error_text()
    assert "Color Loss" in text and "'mask'" in text and "one video" in text, text[:2000]


# ---------------------------------------------------------------------------------------------------
# What the image losses see of a clip's frames


def clip_with_tiny_vae(session) -> tuple[Graph, object]:
    """A one-step clip graph that also loads the tiny decoder lighttaew2_1 through VAELoader ("tiny"), run."""
    g = clip_graph(seed=next(SEEDS), steps=1)
    tiny = g.node("VAELoader", name="tiny", vae_name=wan.families.LIGHTTAEW)
    g.node("PreviewImage", name="preview", images=g.node("VAEDecode", name="tiny_decode", samples=g["encode"][0],
                                                         vae=tiny[0])[0])  # so the loader runs
    r = session.run(g.prompt)
    assert r.ok, r.error_text()[:3000]
    return g, r


def test_decoders_give_each_judged_frame_as_comfyui_decodes_it_alone(session):
    """The pack's `vae` and `taesd` decoders on a clip's frames [B, C, F, h, w]: one image per frame, each equal to
    ComfyUI's VAEDecode of that latent frame as a one-frame clip (its own VAE; the tiny decoder lighttaew2_1 through
    VAELoader)."""
    decoders = probes.pack_module("nodes.decoders")
    runtime = probes.pack_module("nodes.runtime")
    g, r = clip_with_tiny_vae(session)
    model, latent = r.output(g["unet"].id).model, r.output(g["encode"].id)["samples"].float()
    x0 = model.process_latent_in(latent)
    info = runtime.RunInfo(model, "const", torch.device("cpu"), tuple(x0.shape), torch.tensor([1.0, 0.0]))
    picked = [0, 2, 4]
    try:
        with torch.inference_mode(False), torch.no_grad():
            got = {k: decoders.make_decoder(k, r.output(g["vae"].id), info, "test")(x0[:, :, picked].clone())
                   for k in ("vae", "taesd")}
    finally:
        info.close()
    for kind, vae in (("vae", r.output(g["vae"].id)), ("taesd", r.output(g["tiny"].id))):
        assert got[kind].shape == (len(picked), 3, SIZE, SIZE), (kind, got[kind].shape)
        want = torch.cat([probes.decoded(vae, latent[:, :, t : t + 1]) for t in picked]).movedim(-1, 1) * 2 - 1
        inside = want.abs() < 0.999  # ComfyUI clamps its output to 0..1; the loss decoders do not
        assert torch.allclose(got[kind][inside], want[inside], atol=1e-4), kind


def centred_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity((a - a.mean()).flatten(), (b - b.mean()).flatten(), dim=0))


def test_a_frame_decoded_alone_against_the_whole_clips_decode(session):
    """How close a later latent frame decoded alone (what the image losses judge) is to its frame in ComfyUI's
    decode of the whole clip (README's figures). Wan's causal VAE decodes each frame after the first from the
    ones before it; the first frame is exact either way."""
    g, r = clip_with_tiny_vae(session)
    latent = r.output(g["encode"].id)["samples"].float()
    cos = {}
    for kind, vae in (("vae", r.output(g["vae"].id)), ("taesd", r.output(g["tiny"].id))):
        whole = probes.decoded(vae, latent)  # [17, H, W, 3]
        assert whole.shape[0] == 17
        alone = [probes.decoded(vae, latent[:, :, t : t + 1])[-1] for t in range(latent.shape[2])]
        assert torch.allclose(alone[0], whole[0], atol=1e-4), kind  # the first frame decodes alike
        cos[kind] = [centred_cosine(alone[t], whole[4 * t]) for t in range(1, latent.shape[2])]
        print(f"{kind}: later frames decoded alone vs the whole clip's, pixel cosine "
              + ", ".join(f"{c:.3f}" for c in cos[kind]))
    # measured 0.909, 0.840, 0.772, 0.660 (taesd) and 0.078, -0.130, 0.199, 0.183 (vae) on the moving pattern
    assert min(cos["taesd"]) > 0.6  # the tiny decoder judges a lone frame much as the clip shows it
    assert max(cos["vae"]) < 0.5  # the narrowed test VAE does not: README says so
