"""Apply AGG composes with what sits before it in the graph (ControlNet, LoRA, ModelSamplingSD3, batches, cfg 1)
and guidance moves the result the way the loss asks."""

from __future__ import annotations

import pytest
import torch
from agg_testing import graphs, probes

STEPS = 3


@pytest.fixture(scope="module")
def session(comfy):
    probes.register()
    return comfy


def run_latent(session, g, role="sampler"):
    r = session.run(g.prompt)
    assert r.ok, r.error_text()
    out = r.output(g[role].id)["samples"]
    assert torch.isfinite(out).all()
    return r, out


def records(tag: str, kind: str) -> list[dict]:
    return [rec for rec in probes.RECORDS[tag] if rec["kind"] == kind]


def probed(tag: str, **kw):
    probes.RECORDS[tag].clear()
    return probes.agg_img2img(probe=tag, steps=STEPS, **kw)


# -- model passes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("manifold, extra", [("finite_difference", 1), ("none", 0)])
def test_model_passes_per_guided_step(session, manifold, extra):
    tag = f"passes_{manifold}"
    g = probed(tag, seed=301 + extra, manifold=manifold)
    r, _ = run_latent(session, g)
    guided = len(r.events("agg.terms"))
    assert guided == STEPS
    calls = records(tag, "calc_cond_batch")
    assert len(calls) == STEPS + extra * guided
    # the sampler's passes are the full CFG model (cond + uncond); the finite-difference probe is the
    # conditional prediction alone (half a CFG pass)
    assert sum(c["conds"] == 2 for c in calls) == STEPS
    assert sum(c["conds"] == 1 for c in calls) == extra * guided
    assert len(records(tag, "apply_model")) >= len(calls)


def test_guidance_window_limits_the_extra_passes(session):
    tag = "window"
    g = probed(tag, seed=303, end_percent=0.5)
    r, _ = run_latent(session, g)
    guided = len(r.events("agg.terms"))
    assert 0 < guided < STEPS
    assert len(records(tag, "calc_cond_batch")) == STEPS + guided


def test_cfg_one_makes_no_uncond_pass(session):
    tag = "cfg1"
    g = probed(tag, seed=304, cfg=1.0)
    r, _ = run_latent(session, g)
    guided = len(r.events("agg.terms"))
    calls = records(tag, "calc_cond_batch")
    assert guided == STEPS and len(calls) == STEPS + guided
    assert all(c["conds"] == 1 for c in calls)
    assert all(a["batch"] == 1 for a in records(tag, "apply_model"))


def test_controlnet_is_honoured_on_every_pass(session):
    tag = "controlnet"
    g = probed(tag, seed=305)
    graphs.with_controlnet(g, strength=1.0)
    r, _ = run_latent(session, g)
    guided = len(r.events("agg.terms"))
    passes = records(tag, "apply_model")
    assert guided == STEPS and len(records(tag, "calc_cond_batch")) == STEPS + guided
    assert len(passes) >= STEPS + guided  # the finite-difference passes included
    assert all(p["control"] for p in passes), passes
    assert all("output" in p["control_keys"] or p["control_keys"] for p in passes)


# -- LoRA -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_name(session, agg_models, tmp_path_factory):
    """A rank-4 LoRA on the tiny UNet's first time-embedding layer, in a registered 'loras' folder."""
    import folder_paths
    from safetensors import safe_open
    from safetensors.torch import save_file

    ckpt = agg_models.path("checkpoints", agg_models.checkpoint)
    with safe_open(str(ckpt), framework="pt") as f:
        out_f, in_f = f.get_slice("model.diffusion_model.time_embed.0.weight").get_shape()
    g = torch.Generator().manual_seed(0)
    rank = 4
    key = "lora_unet_time_embed_0"
    tensors = {
        f"{key}.lora_up.weight": torch.randn((out_f, rank), generator=g) * 0.5,
        f"{key}.lora_down.weight": torch.randn((rank, in_f), generator=g) * 0.5,
        f"{key}.alpha": torch.tensor(float(rank)),
    }
    folder = tmp_path_factory.mktemp("loras")
    name = "agg-test-lora.safetensors"
    save_file(tensors, str(folder / name))
    folder_paths.add_model_folder_path("loras", str(folder), is_default=True)
    return name


def test_lora_patched_model_is_guided(session, lora_name):
    def graph(lora: bool, guided: bool):
        g = probes.agg_img2img(seed=307, weight=None)
        if lora:
            graphs.insert_model_patch(g, "LoraLoaderModelOnly", name="lora", lora_name=lora_name, strength_model=1.0)
        if guided:
            probes.add_agg(g)
        return g

    _, plain = run_latent(session, graph(False, False))
    _, lora = run_latent(session, graph(True, False))
    r, lora_agg = run_latent(session, graph(True, True))
    assert (lora - plain).abs().max() > 1e-3, "the LoRA did not change the model"
    assert (lora_agg - lora).abs().max() > 1e-3
    assert len(r.events("agg.terms")) == STEPS


# -- batches, flow models, autograd ------------------------------------------------------------------


def test_batch_of_two(session):
    def graph(guided: bool):
        g = probes.agg_img2img(seed=308, weight=None)
        rep = g.node("RepeatLatentBatch", name="repeat", samples=g["encode"][0], amount=2)
        g.set_input(g["sampler"], latent_image=rep[0])
        if guided:
            probes.add_agg(g)  # the source stays a batch of one, shared by both samples
        return g

    _, plain = run_latent(session, graph(False))
    _, out = run_latent(session, graph(True))
    assert out.shape[0] == 2
    assert (out - plain).abs().flatten(1).amax(1).min() > 1e-3  # both samples are guided
    assert (out[0] - out[1]).abs().max() > 1e-3  # each keeps its own noise


def test_flow_model(session):
    def graph(guided: bool):
        g = probes.agg_img2img(seed=309, weight=None)
        graphs.with_flow(g, shift=3.0)
        if guided:
            probes.add_agg(g)
        return g

    _, plain = run_latent(session, graph(False))
    r, out = run_latent(session, graph(True))
    assert len(r.events("agg.terms")) == STEPS
    assert (out - plain).abs().max() > 1e-3


def test_autograd_manifold_on_the_tiny_model(session):
    _, plain = run_latent(session, probes.agg_img2img(seed=311, weight=None))  # shared with the weight sweep
    r, ad = run_latent(session, probes.agg_img2img(seed=311, manifold="autograd"))
    assert len(r.events("agg.terms")) == STEPS
    assert all(not e["skipped"] for e in r.events("agg.terms"))
    assert (ad - plain).abs().max() > 1e-3


# -- the direction of guidance --------------------------------------------------------------------

WEIGHTS = (0.05, 0.15, 0.3)
FIGURES: dict[str, float] = {}


def distance_to_source(session, weight, asymmetric=True, seed=311):
    g = probes.agg_img2img(seed=seed, weight=weight, asymmetric=asymmetric)
    r, out = run_latent(session, g)
    source = r.output(g["encode"].id)["samples"]
    return float((out - source).abs().mean())


def test_structure_loss_pulls_toward_the_source_as_weight_rises(session):
    base = distance_to_source(session, None)
    dists = [distance_to_source(session, w) for w in WEIGHTS]
    FIGURES.update({"unguided": base, **{f"w={w}": d for w, d in zip(WEIGHTS, dists, strict=True)}})
    print("L1 distance to source:", FIGURES)
    assert dists[0] < base
    assert dists[0] > dists[1] > dists[2], dists


def test_symmetric_switch_moves_less(session):
    w = WEIGHTS[1]
    base = distance_to_source(session, None)
    asym = distance_to_source(session, w, asymmetric=True)
    sym = distance_to_source(session, w, asymmetric=False)
    print(f"L1 distance to source at weight {w}: unguided {base:.4f} symmetric {sym:.4f} asymmetric {asym:.4f}")
    assert asym < sym < base
