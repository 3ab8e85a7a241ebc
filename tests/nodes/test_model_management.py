"""Guided runs under ComfyUI's model management as ComfyUI 0.33 drives it: conds carrying hooks (which make its
guider swap a Dynamic VRAM model for a non-dynamic delegate holding another copy of the model), and multi-GPU
sampling's per-device model clones (run under no_grad). The gradient paths must see the model the guider
samples with and keep their gradient.

Dynamic VRAM itself needs an NVIDIA GPU (on the CPU ComfyUI makes plain ModelPatchers): its loading state on
the modules is covered in test_weights.py, and guided workflows under it run in tests/gpu/run_gpu_checks.sh.
"""

from __future__ import annotations

import logging

import pytest
import torch
from agg_testing import probes

STEPS = 3
DELEGATES: list = []


def dynamic_like_patcher_class():
    """A ModelPatcher that reports itself dynamic, as ComfyUI 0.33's ModelPatcherDynamic does on a GPU, and
    hands the guider a non-dynamic delegate on its own copy of the model when conds carry hooks (ComfyUI's own
    clone(disable_dynamic=True), which ModelPatcherDynamic.get_non_dynamic_delegate calls)."""
    import comfy.model_patcher

    class DynamicLikePatcher(comfy.model_patcher.ModelPatcher):
        def is_dynamic(self) -> bool:
            return True

        def set_in_use_by_current_prompt(self, in_use: bool) -> None:
            pass  # ModelPatcherDynamic's pinned-memory bookkeeping: nothing pinned here

        def get_non_dynamic_delegate(self):
            # ComfyUI reloads the model through the loader's recorded init (a checkpoint loaded anew)
            delegate = self.clone(disable_dynamic=True)
            DELEGATES.append(delegate)
            return delegate

    return DynamicLikePatcher


class AGGTestDynamicLike:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",)}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = "AGG/testing"

    def patch(self, model):
        m = model.clone()
        m.__class__ = dynamic_like_patcher_class()
        return (m,)


class AGGTestSingleDeviceMultiGPU:
    """Runs the sampling through ComfyUI's multi-GPU cond path (model_options["multigpu_clones"], as 0.33's
    outer_sample sets it when MultiGPU nodes add per-device clones) with the sampling model as the only device's
    clone. ComfyUI versions without multi-GPU sampling ignore the entry."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",)}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = "AGG/testing"

    def patch(self, model):
        import comfy.patcher_extension

        def outer_sample(executor, *args, **kwargs):
            guider = executor.class_obj
            guider.model_options["multigpu_clones"] = {guider.model_patcher.load_device: guider.model_patcher}
            return executor(*args, **kwargs)

        m = model.clone()
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, "agg_test_multigpu", outer_sample)
        return (m,)


class AGGTestHookedCond:
    """The conditioning with a model hook attached: a weight hook that scales the UNet's matrices by (1 + strength)
    while that conditioning is evaluated (ComfyUI's hook mechanism, as Create Hook LoRA / Cond Set Props use it)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "conditioning": ("CONDITIONING",), "strength": ("FLOAT", {"default": 0.5})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "attach"
    CATEGORY = "AGG/testing"

    def attach(self, model, conditioning, strength):
        import comfy.hooks

        weights = {k: v * 2.0 for k, v in comfy.hooks.get_patch_weights_from_model(model).items()
                   if k.startswith("diffusion_model.") and v.ndim >= 2}  # as a LoRA: + strength * (2W - W)
        hooks = comfy.hooks.create_hook_model_as_lora(weights_model=weights, weights_clip=None,
                                                      strength_model=strength, strength_clip=0.0)
        (cond,) = comfy.hooks.set_conds_props(conds=[conditioning], strength=1.0, set_cond_area="default", hooks=hooks)
        return (cond,)


NODES = {"AGGTestDynamicLike": AGGTestDynamicLike, "AGGTestSingleDeviceMultiGPU": AGGTestSingleDeviceMultiGPU,
         "AGGTestHookedCond": AGGTestHookedCond}


@pytest.fixture(scope="module")
def session(comfy):
    import nodes

    probes.register()
    for name, cls in NODES.items():
        nodes.NODE_CLASS_MAPPINGS.setdefault(name, cls)
        nodes.NODE_DISPLAY_NAME_MAPPINGS.setdefault(name, name)
    return comfy


@pytest.fixture
def seen(monkeypatch):
    """What each AGG run was opened on: the guider's patcher and model, and the module autograd went through."""
    runtime = probes.pack_module("nodes.runtime")
    runs: list[dict] = []
    open_run, weights_init = runtime.open_run, runtime.GradientWeights.__init__

    def record_run(node_name, node_id, settings, loss, guider, *args, **kwargs):
        runs.append({"patcher": guider.model_patcher, "model": guider.inner_model, "autograd": []})
        return open_run(node_name, node_id, settings, loss, guider, *args, **kwargs)

    def record_weights(self, module):
        runs[-1]["autograd"].append(module)
        weights_init(self, module)

    monkeypatch.setattr(runtime, "open_run", record_run)
    monkeypatch.setattr(runtime.GradientWeights, "__init__", record_weights)
    return runs


def hooked(g, strength: float = 0.5):
    """The positive prompt's conditioning carries a model hook (AGGTestHookedCond)."""
    cond = g.node("AGGTestHookedCond", name="hooked", model=g["ckpt"][0], conditioning=g["positive"][0], strength=strength)
    g.set_input(g["sampler"], positive=cond[0])
    return g


def run_latent(session, g) -> tuple:
    r = session.run(g.prompt)
    assert r.ok, r.error_text()
    out = r.output(g["sampler"].id)["samples"]
    assert torch.isfinite(out).all()
    return r, out


def l1(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().mean())


def pack_warnings(caplog) -> list[str]:
    return [rec.getMessage() for rec in caplog.records if rec.name == "AGG" and rec.levelno >= logging.WARNING]


def guided(session, caplog, g) -> tuple:
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="AGG"):
        r, out = run_latent(session, g)
    assert pack_warnings(caplog) == []  # no fallback (autograd -> finite differences), nothing skipped
    events = r.events("agg.terms")
    assert len(events) == STEPS and all(not e["skipped"] for e in events)
    return r, out


@pytest.mark.parametrize("manifold", ["finite_difference", "autograd"])
def test_guidance_with_conds_carrying_hooks(session, caplog, seen, manifold):
    plain = probes.agg_img2img(seed=331, steps=STEPS, weight=None)
    _, unhooked = run_latent(session, plain)
    _, hooked_plain = run_latent(session, hooked(probes.agg_img2img(seed=331, steps=STEPS, weight=None)))
    assert l1(hooked_plain, unhooked) > 1e-4  # the hook changes the model the sampler runs
    g = hooked(probes.agg_img2img(seed=331, steps=STEPS, manifold=manifold))
    r, out = guided(session, caplog, g)
    source = r.output(g["encode"].id)["samples"]
    assert l1(out, source) < l1(hooked_plain, source), (l1(out, source), l1(hooked_plain, source))
    assert len(seen) == 1 and len(seen[0]["autograd"]) == (manifold == "autograd")


def test_hooks_swap_the_guider_to_a_non_dynamic_delegate(session, caplog, seen):
    """On ComfyUI 0.33 a dynamic model's guider samples with a delegate holding another copy of the model: the
    run, its conditional probe and the autograd pass follow the delegate's model, not the one the MODEL input
    holds. Older ComfyUI versions sample the MODEL input's own model."""
    import comfy.model_patcher

    swaps = hasattr(comfy.model_patcher, "ModelPatcherDynamic")
    DELEGATES.clear()
    g = hooked(probes.agg_img2img(seed=337, steps=STEPS, manifold="autograd"))
    dyn = g.node("AGGTestDynamicLike", name="dynamic", model=g["ckpt"][0])
    g.set_input(g["apply"], model=dyn[0])
    _, hooked_plain = run_latent(session, hooked(probes.agg_img2img(seed=337, steps=STEPS, weight=None)))
    r, out = guided(session, caplog, g)
    source = r.output(g["encode"].id)["samples"]
    assert l1(out, source) < l1(hooked_plain, source)
    (run,) = seen
    if swaps:
        assert len(DELEGATES) == 1 and run["patcher"] is DELEGATES[0]
        assert run["model"] is DELEGATES[0].model
    else:
        assert DELEGATES == [] and type(run["patcher"]).__name__ == "DynamicLikePatcher"
        assert run["model"] is run["patcher"].model
    assert run["autograd"] == [run["model"].diffusion_model]


@pytest.mark.parametrize("manifold", ["finite_difference", "autograd"])
def test_guidance_through_multigpu_clones(session, caplog, seen, manifold):
    """Multi-GPU sampling evaluates conds under no_grad on per-device clones: guidance still runs, the autograd
    pass on the main device's model."""
    g = probes.agg_img2img(seed=341, steps=STEPS, manifold=manifold)
    multi = g.node("AGGTestSingleDeviceMultiGPU", name="multigpu", model=g["ckpt"][0])
    g.set_input(g["apply"], model=multi[0])
    _, plain = run_latent(session, probes.agg_img2img(seed=341, steps=STEPS, weight=None))
    r, out = guided(session, caplog, g)
    source = r.output(g["encode"].id)["samples"]
    assert l1(out, source) < l1(plain, source)
    (run,) = seen
    assert run["autograd"] == ([run["model"].diffusion_model] if manifold == "autograd" else [])
