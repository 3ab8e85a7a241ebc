"""Stock ComfyUI graphs run on the generated tiny SD1.5 fixtures, in-process and on a real server."""

from __future__ import annotations

import torch
from agg_testing import graphs
from agg_testing.runner import load_image
from PIL import Image
from safetensors.torch import load_file

SIZE = 64


def assert_image(path, size=SIZE):
    assert path.is_file(), path
    with Image.open(path) as im:
        assert im.size == (size, size)
        assert im.mode == "RGB"


def test_img2img_in_process(comfy):
    g = graphs.img2img(size=SIZE, steps=3, denoise=0.6, seed=11)
    graphs.save_latent(g, g["sampler"][0])
    result = comfy.run(g.prompt)
    assert result.ok, result.error_text()
    assert len(result.images) == 1
    assert_image(result.images[0])
    # the run's own data: the sampled latent, the decoded image and the progress it reported
    latent = result.output(g["sampler"].id)["samples"]
    assert latent.shape == (1, 4, SIZE // 8, SIZE // 8) and torch.isfinite(latent).all()
    (latent_file,) = [f for f in result.files if f.suffix == ".latent"]
    assert torch.equal(load_file(str(latent_file))["latent_tensor"], latent)
    decoded = result.output(g["decode"].id)
    assert decoded.shape == (1, SIZE, SIZE, 3)
    saved = load_image(result.images[0])
    assert (saved - decoded).abs().max() < 1 / 255 + 1e-6  # the file is the decoded tensor, 8-bit
    progress = [m for m in result.events("progress") if m["node"] == g["sampler"].id]
    assert progress and progress[-1]["value"] == progress[-1]["max"] == 3
    assert any(event == "execution_success" for event, _ in result.messages)


def test_img2img_validation_error_is_data(comfy):
    g = graphs.img2img()
    g.set_input(g["ckpt"], ckpt_name="missing.safetensors")
    result = comfy.run(g.prompt)
    assert not result.ok
    assert result.errors[0]["type"] == "validation"
    assert g["ckpt"].id in result.errors[0]["node_errors"]


def test_controlnet_changes_the_sample(comfy):
    plain = graphs.img2img(seed=5, steps=2)
    with_cn = graphs.img2img(seed=5, steps=2)
    graphs.with_controlnet(with_cn, strength=1.0)
    a, b = comfy.run(plain.prompt), comfy.run(with_cn.prompt)
    assert a.ok and b.ok, a.error_text() + b.error_text()
    la, lb = a.output(plain["sampler"].id)["samples"], b.output(with_cn["sampler"].id)["samples"]
    assert torch.isfinite(lb).all()
    assert not torch.allclose(la, lb)


def test_flow_model_sampling_is_const_and_samples(comfy):
    from comfy.model_sampling import CONST

    g = graphs.img2img(seed=3, steps=3)
    graphs.with_flow(g, shift=3.0)
    assert g.prompt[g["sampler"].id]["inputs"]["model"] == g["flow"][0]
    result = comfy.run(g.prompt)
    assert result.ok, result.error_text()
    patched = result.output(g["flow"].id)
    sampling = patched.get_model_object("model_sampling")
    assert isinstance(sampling, CONST)
    assert float(sampling.sigma_max) <= 1.0
    assert torch.isfinite(result.output(g["sampler"].id)["samples"]).all()
    assert_image(result.images[0])


def test_img2img_on_the_server(comfy_server):
    g = graphs.img2img(size=SIZE, steps=3, denoise=0.6, seed=12, filename_prefix="agg_server")
    entry = comfy_server.run(g.prompt, timeout=300)
    assert entry["status"]["status_str"] == "success", comfy_server.errors(entry)
    assert not comfy_server.errors(entry)
    images = comfy_server.images(entry)
    assert len(images) == 1
    assert_image(images[0])
    served = entry["outputs"][g["save"].id]["images"][0]
    assert comfy_server.view(served) == images[0].read_bytes()
