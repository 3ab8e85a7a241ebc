"""A small SD1.5-architecture model that has actually learned to denoise, trained on CPU at test time.

Random-weight UNets have arbitrary Jacobians, so guidance tests on them cannot tell a correct
manifold step from a wrong one. This module trains the tiny one-level SD1.5 UNet of
``fixtures.TINY_UNET_CONFIG`` (the same checkpoint layout ComfyUI detects as SD1.5, with the same
TAESD-architecture VAE) as an eps-prediction denoiser, through ComfyUI's own ``BaseModel.apply_model``
and SD1.5 ``model_sampling``, on latents of real photographs that ship inside the scikit-image wheel
(``skimage/data``; nothing is downloaded, the package is only used as a data source).

Data. Random square crops (side between ``size`` px and half the photo's short side, random
horizontal flip) of the natural photos in ``PHOTOS``, resized to ``size`` px and encoded with the
fixture VAE's encoder (random TAESD weights, i.e. fixed random image features). Each photo is cut
into square tiles; every fourth tile is held back, so the held-back latents come from pixels the
training never saw.

Latent scale. The random encoder's raw output has a small, arbitrary scale (std ~0.07). As SD's own
VAE scale factor does, the checkpoint's ``vae_scale`` / ``vae_shift`` are calibrated on the training
latents so that model-space latents (``VAEEncode`` then ``process_latent_in``) have zero mean and unit
mean per-element variance. The SD1.5 noise schedule (sigma up to 14.6) then means what it means for
real SD latents.

Decoder. The random encoder keeps the photo's colours and coarse layout in its latents; its TAESD
decoder (random too) would show noise. The decoder is trained to reconstruct the training crops from
their latents (pixel MSE, Adam, the encoder fixed so the UNet's latents stay what it learned on): it
starts as SD-style zero-residual blocks with identity upsampling convolutions and a least-squares linear
read-out of each latent cell's 3x3 neighbourhood (the crop's blurred colours), then learns the rest.
The encoder's last (linear) convolution is re-expressed so that it gives the calibrated model-space
latents directly; the checkpoint then carries SD1.5's own TAESD constants (scale 0.18215, shift 0), and
the same decoder works as the checkpoint's VAE (VAEDecode, the pack's `vae` decoder) and as a
models/vae_approx TAESD pair (the pack's `taesd` decoder, VAELoader "taesd"): all three decode a latent
to the same pixels. The reconstructions are blurry but recognisably the photo (``evidence()``).

Text conditioning. The cross-attention output projections (``attn2.to_out``) are zero and stay zero:
the model is unconditional, so any prompt (and any CFG scale) gives the same denoiser.

Training. Adam with warm-up and cosine decay, sigma log-uniform over SD1.5's range (optionally a
share of the batch above ``sigma_high``), loss
``(sigma^2 + 1) / sigma^2 * |D(z + sigma n) - z|^2`` (every noise level weighted alike for
unit-variance data), the UNet only. Residual branches and the output convolution start at zero as in
SD's own initialisation; every other tensor starts from the random fixture UNet
(``fixtures.random_state_dict``). Deterministic: seeded generators, a fixed thread count and
``torch.use_deterministic_algorithms`` give the same bytes for the same arguments on the same torch.

The checkpoint is cached under ``$AGG_HOME/fixtures`` keyed by the arguments (``TrainConfig``), the
torch and ComfyUI versions, next to a ``-data`` file with the held-back latents, the training
latents' mean and the loss curves, which ``evidence()`` uses, and the VAE as a TAESD pair
(``-taesd_encoder`` / ``-taesd_decoder``). The UNet has its own cache entry (``sd15-trained-unet``, keyed
by every argument but the decoder's ``dec_*``), so a decoder setting can change without retraining it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from agg_testing import fixtures

TRAINED_VERSION = "2"  # 2: trained TAESD decoder, encoder giving model-space latents
UNET_VERSION = "1"  # the UNet's own cache entry (the decoder can change without retraining it)
CHECKPOINT_TRAINED = fixtures.CHECKPOINT_TRAINED

# Natural photographs bundled in scikit-image's wheel (skimage/data). Grey ones are used as RGB.
PHOTOS: tuple[str, ...] = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "retina.jpg",
    "camera.png",
    "coins.png",
    "moon.png",
)
HELD_BACK_EVERY = 4  # every 4th tile of each photo is held back
EVAL_SIGMAS: tuple[float, ...] = (0.5, 2.0, 8.0)
MID_SIGMA = 2.0


@dataclass(frozen=True)
class TrainConfig:
    """Everything the trained checkpoint depends on (the cache key)."""

    size: int = 64  # image side in px; latents are size // 8
    n_train: int = 1024  # training crops (encoded once)
    n_test: int = 256  # held-back crops
    steps: int = 300
    batch: int = 32
    lr: float = 1e-3
    warmup: int = 16
    # training sigmas: log-uniform in [sigma_lo, SD1.5's sigma_max]; high_share of them in [sigma_high, sigma_max]
    sigma_lo: float = 0.1
    sigma_high: float = 2.0
    high_share: float = 0.0
    stf: bool = True  # regress on the training set's posterior mean (stable target field)
    seed: int = 0
    threads: int = 2
    photos: tuple[str, ...] = PHOTOS
    # the VAE decoder (fields named dec_*; the UNet does not depend on them): Adam steps on full crops
    # (pixel MSE), batch, peak learning rate, warm-up steps
    dec_steps: int = 150
    dec_batch: int = 16
    dec_lr: float = 1e-3
    dec_warmup: int = 10


# ---------------------------------------------------------------------------------------------------
# Data


def photo_dir() -> Path:
    """scikit-image's bundled data folder (located without importing the package)."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the trained test model needs scikit-image's bundled photos: pip install scikit-image "
                           "(listed in requirements-dev.txt)")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def load_photo(name: str) -> np.ndarray:
    """A bundled photo as float32 RGB in 0..1, (H, W, 3)."""
    from PIL import Image

    with Image.open(photo_dir() / name) as im:
        return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0


def tiles(shape: tuple[int, ...], index: int) -> tuple[list[tuple[int, int, int]], list[tuple[int, int, int]]]:
    """(train, held-back) tiles (y, x, side) of a photo: squares of half the short side; every
    HELD_BACK_EVERY-th one (offset by the photo's index) is held back."""
    h, w = shape[:2]
    side = min(h, w) // 2
    all_tiles = [(y * side, x * side, side) for y in range(h // side) for x in range(w // side)]
    held = [t for i, t in enumerate(all_tiles) if (i + index) % HELD_BACK_EVERY == 0]
    return [t for t in all_tiles if t not in held], held


def crops(config: TrainConfig, split: str, n: int, seed: int) -> torch.Tensor:
    """n random crops (split "train" or "test") as a ComfyUI IMAGE batch (n, size, size, 3) in 0..1."""
    from PIL import Image

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    photos = [load_photo(name) for name in config.photos]
    regions = [tiles(p.shape, i)[0 if split == "train" else 1] for i, p in enumerate(photos)]
    out = np.empty((n, config.size, config.size, 3), dtype=np.float32)
    for k in range(n):
        i = int(rng.integers(len(photos)))
        y0, x0, side = regions[i][int(rng.integers(len(regions[i])))]
        s = int(rng.integers(config.size, side + 1))
        y = y0 + int(rng.integers(side - s + 1))
        x = x0 + int(rng.integers(side - s + 1))
        patch = Image.fromarray(np.round(photos[i][y : y + s, x : x + s] * 255).astype(np.uint8))
        patch = patch.resize((config.size, config.size), Image.BILINEAR)
        arr = np.asarray(patch, dtype=np.float32) / 255.0
        out[k] = arr[:, ::-1] if rng.random() < 0.5 else arr
    return torch.from_numpy(out)


def encode_raw(vae, images: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """The VAE encoder's raw latents (the fixture checkpoint's VAE maps them to VAE space unchanged
    up to SD1.5's 1/0.18215): first_stage_model.encode on pixels in -1..1, as VAE.encode does."""
    pixels = images.movedim(-1, 1) * 2.0 - 1.0
    with torch.no_grad():
        parts = [vae.first_stage_model.encode(pixels[i : i + batch]).float() for i in range(0, len(pixels), batch)]
    return torch.cat(parts) * fixtures.SD15_LATENT_SCALE


# ---------------------------------------------------------------------------------------------------
# Model set-up


@contextlib.contextmanager
def deterministic(threads: int) -> Iterator[None]:
    """Fixed thread count and deterministic algorithms for the duration (restored afterwards)."""
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old_det, warn_only=old_warn)
        torch.set_num_threads(old_threads)


def _zero_init(name: str) -> bool:
    """Tensors SD's initialisation sets to zero: residual-branch outputs and the final convolution."""
    return (
        ".out_layers.3." in name  # ResBlock's second convolution
        or ".proj_out." in name  # SpatialTransformer's output projection
        or name.startswith("out.2.")  # the UNet's output convolution
        or ".attn2.to_out." in name  # cross-attention output: zero and frozen (unconditional model)
    )


def load_base(path: Path):
    """(BaseModel, VAE) of a checkpoint through ComfyUI's loader, outside inference mode (trainable)."""
    import comfy.sd

    with torch.inference_mode(False):
        patcher, _, vae, _ = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=False)
    return patcher.model, vae


def warmup_cosine(step: int, steps: int, warmup: int, peak: float) -> float:
    """Learning rate at `step`: linear warm-up over `warmup` steps, then cosine decay to 0 over `steps`."""
    lr = peak * min(1.0, (step + 1) / warmup)
    return lr * (0.5 * (1 + math.cos(math.pi * step / steps)))


def adam_step(opt: torch.optim.Optimizer, loss: torch.Tensor, losses: list[float]) -> None:
    """One optimiser step on `loss`, its value appended to `losses`."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    losses.append(float(loss.detach()))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def null_context(batch: int) -> torch.Tensor:
    """Cross-attention context for the unconditional model (ignored: attn2's output is zero)."""
    return torch.zeros(batch, 1, 768)


def denoise(model, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """ComfyUI's denoised estimate D(x, sigma) (BaseModel.apply_model: eps prediction through SD1.5's
    model_sampling), with the null context."""
    s = torch.as_tensor(sigma, dtype=x.dtype).expand(x.shape[0]).contiguous()
    return model.apply_model(x, s, c_crossattn=null_context(x.shape[0]))


# ---------------------------------------------------------------------------------------------------
# Training


@dataclass
class TrainResult:
    unet: dict[str, torch.Tensor]
    scale: float  # raw -> model-space: (raw - shift) / scale
    shift: float
    train_mean: torch.Tensor  # model-space mean of the training latents
    test_latents: torch.Tensor  # model-space held-back latents
    losses: list[float] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    train_latents: torch.Tensor | None = None  # model-space training latents (the decoder learns from them)


def train(config: TrainConfig, *, log=None) -> TrainResult:
    """Encode the data, calibrate the latent scale and train the UNet (see the module docstring)."""
    seconds: dict[str, float] = {}
    with deterministic(config.threads), torch.inference_mode(False):
        t0 = time.perf_counter()
        model, vae = load_base(fixtures.sd15_tiny_checkpoint("taesd"))
        raw_train = encode_raw(vae, crops(config, "train", config.n_train, config.seed))
        raw_test = encode_raw(vae, crops(config, "test", config.n_test, config.seed))
        seconds["encode"] = time.perf_counter() - t0

        shift = float(raw_train.mean())
        scale = float(raw_train.var(dim=0).mean().sqrt())
        z_train = (raw_train - shift) / scale
        z_test = (raw_test - shift) / scale

        unet = model.diffusion_model
        unet.train()
        params = []
        with torch.no_grad():
            for name, p in unet.named_parameters():
                if _zero_init(name):
                    p.zero_()
                # cross-attention has no effect with a zero output projection: not trained
                p.requires_grad_(".attn2." not in name)
                if p.requires_grad:
                    params.append(p)
        opt = torch.optim.Adam(params, lr=config.lr, betas=(0.9, 0.99), fused=True)
        ms = model.model_sampling
        log_lo, log_hi = math.log(config.sigma_lo), math.log(float(ms.sigma_max))
        log_high = math.log(config.sigma_high)
        flat_train = z_train.flatten(1)
        sq_train = flat_train.pow(2).sum(1)
        g = torch.Generator().manual_seed(config.seed)
        losses = []
        t0 = time.perf_counter()
        for step in range(config.steps):
            set_lr(opt, warmup_cosine(step, config.steps, config.warmup, config.lr))
            idx = torch.randint(len(z_train), (config.batch,), generator=g)
            z = z_train[idx]
            lo = log_lo
            if config.high_share > 0:
                lo = torch.where(torch.rand(config.batch, generator=g) < config.high_share, log_high, log_lo)
            sigma = torch.exp(lo + (log_hi - lo) * torch.rand(config.batch, generator=g))
            noise = torch.randn(z.shape, generator=g)
            s4 = sigma.view(-1, 1, 1, 1)
            x = z + s4 * noise
            if config.stf:
                z = stable_target(x, sigma, flat_train, sq_train)
            d = denoise(model, x, sigma)
            weight = (s4**2 + 1) / s4**2
            adam_step(opt, (weight * (d - z) ** 2).mean(), losses)
            if log is not None and (step % 20 == 0 or step == config.steps - 1):
                log(f"step {step:4d}/{config.steps} loss {losses[-1]:.4f} ({time.perf_counter() - t0:.0f} s)")
        seconds["train"] = time.perf_counter() - t0
        unet.eval()
        state = {k: v.detach().clone().float().contiguous() for k, v in unet.state_dict().items()}
    return TrainResult(
        unet=state, scale=scale, shift=shift, train_mean=z_train.mean(0), test_latents=z_test,
        losses=losses, seconds=seconds, train_latents=z_train,
    )


def model_space_encoder(encoder: dict[str, torch.Tensor], scale: float, shift: float) -> dict[str, torch.Tensor]:
    """The TAESD encoder's state dict with its last (linear) convolution re-expressed so that it outputs
    (raw - shift) / scale, the calibrated model-space latents, instead of the raw ones."""
    out = {k: v.detach().float().clone().contiguous() for k, v in encoder.items()}
    last = max(int(k.split(".")[0]) for k in out)
    w, b = f"{last}.weight", f"{last}.bias"
    out[w] = (out[w].double() / scale).float().contiguous()
    out[b] = ((out[b].double() - shift) / scale).float().contiguous()
    return out


def init_decoder(decoder: torch.nn.Sequential, z: torch.Tensor, pixels: torch.Tensor, ridge: float = 1e-3) -> None:
    """SD-style start for the TAESD decoder (see the module docstring): residual branches output zero, the
    convolutions after each upsampling pass their input through, and the first and last convolutions hold
    the least-squares linear map from a latent cell's 3x3 neighbourhood (as the decoder's input clamp sees
    it) to the mean colour of the cell's pixels, in channels 0-2 and, negated, 3-5 (the ReLU between them
    then passes the linear map unchanged). pixels: [N, 3, H, W] in 0..1; z: model-space latents."""
    import torch.nn.functional as F

    with torch.no_grad():
        for name, p in decoder.named_parameters():
            if ".conv.4." in name:  # each Block's last convolution
                p.zero_()
        for i, m in enumerate(decoder):
            if isinstance(m, torch.nn.Upsample):
                conv = decoder[i + 1]
                conv.weight.zero_()
                conv.weight[:, :, 1, 1] = torch.eye(conv.weight.shape[0])
        zc = torch.tanh(z / 3) * 3  # the decoder's Clamp
        x = F.unfold(zc, 3, padding=1).transpose(1, 2).reshape(-1, 9 * z.shape[1]).double()
        x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
        factor = pixels.shape[-1] // z.shape[-1]
        y = F.avg_pool2d(pixels, factor).flatten(2).transpose(1, 2).reshape(-1, 3).double()
        a = torch.linalg.solve(x.T @ x / len(x) + ridge * torch.eye(x.shape[1], dtype=x.dtype), x.T @ y / len(x))
        a = a.float()
        first, last = decoder[1], decoder[-1]
        w = a[:-1].T.reshape(3, z.shape[1], 3, 3)
        first.weight[0:3], first.bias[0:3] = w, a[-1]
        first.weight[3:6], first.bias[3:6] = -w, -a[-1]
        last.weight.zero_()
        last.bias.zero_()
        for c in range(3):
            last.weight[c, c, 1, 1] = 1.0
            last.weight[c, c + 3, 1, 1] = -1.0


def train_decoder(config: TrainConfig, decoder: dict[str, torch.Tensor], z: torch.Tensor, images: torch.Tensor,
                  *, log=None) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Train the TAESD decoder (its starting state dict) to map model-space latents z to the crops `images`
    (a ComfyUI IMAGE batch); returns its state dict and the loss curve."""
    from comfy.taesd.taesd import Decoder

    dec = Decoder(z.shape[1])
    dec.load_state_dict({k: v.float() for k, v in decoder.items()})
    dec.train()
    pixels = images.movedim(-1, 1).contiguous().float()
    init_decoder(dec, z, pixels)
    params = list(dec.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=config.dec_lr, betas=(0.9, 0.99), fused=True)
    g = torch.Generator().manual_seed(config.seed + 1)
    losses = []
    t0 = time.perf_counter()
    for step in range(config.dec_steps):
        set_lr(opt, warmup_cosine(step, config.dec_steps, config.dec_warmup, config.dec_lr))
        idx = torch.randint(len(z), (config.dec_batch,), generator=g)
        adam_step(opt, (dec(z[idx]) - pixels[idx]).square().mean(), losses)
        if log is not None and (step % 25 == 0 or step == config.dec_steps - 1):
            log(f"decoder step {step:4d}/{config.dec_steps} loss {losses[-1]:.4f} ({time.perf_counter() - t0:.0f} s)")
    dec.eval()
    return {k: v.detach().clone().float().contiguous() for k, v in dec.state_dict().items()}, losses


def stable_target(x: torch.Tensor, sigma: torch.Tensor, train: torch.Tensor, sq_train: torch.Tensor) -> torch.Tensor:
    """E[z | x] under the empirical distribution of the training latents (Xu et al., "Stable Target
    Field", 2023): the same minimiser as the one-sample target z, with far less variance at high sigma."""
    xf = x.flatten(1)
    d2 = xf.pow(2).sum(1, keepdim=True) - 2 * xf @ train.T + sq_train[None]
    w = torch.softmax(-d2 / (2 * sigma.view(-1, 1) ** 2), dim=1)
    return (w @ train).view_as(x)


def _log(msg: str) -> None:
    print(f"[trained fixture] {msg}", flush=True)


def _build_unet(config: TrainConfig) -> dict[str, dict[str, torch.Tensor]]:
    result = train(config, log=_log)
    data = {
        "test_latents": result.test_latents.contiguous(),
        "train_mean": result.train_mean.contiguous(),
        "train_latents": result.train_latents.contiguous(),
        "losses": torch.tensor(result.losses, dtype=torch.float32),
        "scale_shift": torch.tensor([result.scale, result.shift], dtype=torch.float64),
    }
    _LAST_TIMES.update(result.seconds)  # times vary between runs: kept out of the (byte-identical) files
    return {"-unet": {f"model.diffusion_model.{k}": v for k, v in result.unet.items()}, "-unetdata": data}


def _build(config: TrainConfig, unet_files: dict[str, Path]) -> dict[str, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    unet_data = load_data(unet_files["-unetdata"])
    scale, shift = (float(v) for v in unet_data["scale_shift"])
    ckpt = load_file(str(fixtures.sd15_tiny_checkpoint("taesd")))
    ckpt.update(load_file(str(unet_files["-unet"])))
    vae = {name: {k[len(f"first_stage_model.{name}."):]: v for k, v in ckpt.items()
                  if k.startswith(f"first_stage_model.{name}.")} for name in ("taesd_encoder", "taesd_decoder")}
    with deterministic(config.threads), torch.inference_mode(False):
        t0 = time.perf_counter()
        encoder = model_space_encoder(vae["taesd_encoder"], scale, shift)
        images = crops(config, "train", config.n_train, config.seed)
        decoder, decoder_losses = train_decoder(config, vae["taesd_decoder"], unet_data["train_latents"], images, log=_log)
        _LAST_TIMES["decoder"] = time.perf_counter() - t0
    # The encoder outputs model-space latents; with SD1.5's TAESD constants (VAE space = model space /
    # 0.18215; TAESD.encode divides by vae_scale, decode multiplies by it) VAEEncode + process_latent_in
    # gives them back, and the decoder sees the model-space latent, as a models/vae_approx TAESD does.
    for name, part in (("taesd_encoder.", encoder), ("taesd_decoder.", decoder)):
        for key, value in part.items():
            ckpt[f"first_stage_model.{name}{key}"] = value
    ckpt["first_stage_model.vae_scale"] = torch.tensor(fixtures.SD15_LATENT_SCALE, dtype=torch.float32)
    ckpt["first_stage_model.vae_shift"] = torch.tensor(0.0, dtype=torch.float32)
    data = {
        "test_latents": unet_data["test_latents"],
        "train_mean": unet_data["train_mean"],
        "losses": unet_data["losses"],
        "decoder_losses": torch.tensor(decoder_losses, dtype=torch.float32),
    }
    return {"": ckpt, "-data": data, "-taesd_encoder": encoder, "-taesd_decoder": decoder}


_LAST_TIMES: dict[str, float] = {}


def timing_path(data_path: Path) -> Path:
    """Where the build's times are noted (beside the data file; absent when another process built it)."""
    return Path(data_path).with_name(Path(data_path).stem + ".times.json")


def _params(config: TrainConfig) -> dict:
    return {"trained": TRAINED_VERSION, "torch": torch.__version__, "unet": fixtures.TINY_UNET_CONFIG,
            **asdict(config)}


def _unet_params(config: TrainConfig) -> dict:
    fields = {k: v for k, v in asdict(config).items() if not k.startswith("dec_")}
    return {"trained_unet": UNET_VERSION, "torch": torch.__version__, "unet": fixtures.TINY_UNET_CONFIG, **fields}


def unet_files(config: TrainConfig = TrainConfig(), *, cache_dir: Path | None = None) -> dict[str, Path]:
    """The trained UNet's own cache entry ({"-unet", "-unetdata": path}), shared by every decoder setting."""
    _LAST_TIMES.clear()
    paths = fixtures._cached_files("sd15-trained-unet", _unet_params(config), lambda: _build_unet(config), cache_dir)
    if _LAST_TIMES:
        timing_path(paths["-unetdata"]).write_text(json.dumps(_LAST_TIMES) + "\n")
    return paths


def sd15_trained_files(config: TrainConfig = TrainConfig(), *, cache_dir: Path | None = None) -> dict[str, Path]:
    """{"checkpoint", "data", "taesd_encoder", "taesd_decoder": path}: the trained checkpoint, its evidence
    data and its VAE as a models/vae_approx TAESD pair (cached)."""
    unet = unet_files(config, cache_dir=cache_dir)
    _LAST_TIMES.clear()
    paths = fixtures._cached_files("sd15-trained", _params(config), lambda: _build(config, unet), cache_dir)
    if _LAST_TIMES:
        unet_times = timing_path(unet["-unetdata"])
        times = json.loads(unet_times.read_text()) if unet_times.exists() else {}
        timing_path(paths["-data"]).write_text(json.dumps({**times, **_LAST_TIMES}) + "\n")
    return {"checkpoint": paths[""], "data": paths["-data"], "taesd_encoder": paths["-taesd_encoder"],
            "taesd_decoder": paths["-taesd_decoder"]}


# The command-line demo's colour transfer: a warm photo toward a night-blue one (both bundled with scikit-image;
# the toy model was trained on crops of them, so its blurry reconstructions are recognisable)
DEMO_SOURCE_PHOTO = "coffee.png"  # a red cup of coffee on a wooden table
DEMO_REFERENCE_PHOTO = "rocket.jpg"  # a rocket on its launch pad at dusk: dark blues
DEMO_SOURCE, DEMO_REFERENCE = "color_source.png", "color_reference.png"


def square_photo(name: str, path: Path, size: int = 256) -> Path:
    """A bundled photo's centre square at `size` px, as a PNG at `path`."""
    from PIL import Image

    photo = load_photo(name)
    h, w = photo.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    square = np.round(photo[top : top + s, left : left + s] * 255).astype(np.uint8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(square).resize((size, size), Image.LANCZOS).save(path)
    return path


def demo_images(folder: Path) -> dict[str, Path]:
    """Write the demo's source photo and colour reference into `folder`: {"source": path, "reference": path}."""
    return {"source": square_photo(DEMO_SOURCE_PHOTO, Path(folder) / DEMO_SOURCE),
            "reference": square_photo(DEMO_REFERENCE_PHOTO, Path(folder) / DEMO_REFERENCE)}


VAE_APPROX_TRAINED = "vae_approx_trained"  # folder of a models tree holding the trained model's TAESD pair


def link_trained(root: Path, config: TrainConfig = TrainConfig()) -> dict[str, Path]:
    """Link the trained checkpoint into root/checkpoints (as CHECKPOINT_TRAINED) and its TAESD pair into
    root/vae_approx_trained (taesd_encoder / taesd_decoder.safetensors, for --vae-approx or a
    `vae_approx:` entry of extra_model_paths.yaml); returns {"checkpoint": link, "vae_approx": folder}."""
    files = sd15_trained_files(config)
    root = Path(root)
    fixtures._link(files["checkpoint"], root / "checkpoints" / CHECKPOINT_TRAINED)
    folder = root / VAE_APPROX_TRAINED
    fixtures._link(files["taesd_encoder"], folder / fixtures.TAESD_ENCODER)
    fixtures._link(files["taesd_decoder"], folder / fixtures.TAESD_DECODER)
    return {"checkpoint": root / "checkpoints" / CHECKPOINT_TRAINED, "vae_approx": folder}


def sd15_trained_checkpoint(config: TrainConfig = TrainConfig(), *, cache_dir: Path | None = None) -> Path:
    """The trained tiny SD1.5 checkpoint (trained on first use, a few minutes on 2 cores)."""
    return sd15_trained_files(config, cache_dir=cache_dir)["checkpoint"]


def load_data(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


# ---------------------------------------------------------------------------------------------------
# Evidence


@dataclass
class DenoisingRow:
    sigma: float
    model: float  # mean squared error per latent element
    mean: float  # the data mean
    shrink: float  # the best scalar shrinkage toward the mean, a * (x - mean) + mean
    linear: float  # the best linear (full covariance) estimate, for reference

    @property
    def best_trivial(self) -> float:
        return min(self.mean, self.shrink)

    @property
    def ratio(self) -> float:
        return self.model / self.best_trivial


def denoising_table(
    model, latents: torch.Tensor, reference: torch.Tensor | None = None, sigmas: Sequence[float] = EVAL_SIGMAS,
    seed: int = 1234, batch: int = 64,
) -> list[DenoisingRow]:
    """Denoising MSE of `model` (a ComfyUI BaseModel) on `latents` at each sigma, against the trivial
    denoisers fitted on the same latents (the strongest version of them). `reference` (e.g. the training
    latents' mean) is unused by the baselines; the linear estimate uses the latents' own covariance."""
    z = latents.double().flatten(1)
    mu = z.mean(0)
    zc = z - mu
    cov = zc.T @ zc / len(z)
    g = torch.Generator().manual_seed(seed)
    rows = []
    for sigma in sigmas:
        noise = torch.randn(latents.shape, generator=g, dtype=torch.float32)
        x = latents + sigma * noise
        with torch.no_grad():
            d = torch.cat([denoise(model, x[i : i + batch], sigma) for i in range(0, len(x), batch)])
        err_model = float((d.double() - latents.double()).pow(2).mean())
        xc = x.double().flatten(1) - mu
        err_mean = float(zc.pow(2).mean())
        a = float((xc * zc).sum() / (xc * xc).sum())
        err_shrink = float((a * xc - zc).pow(2).mean())
        wiener = cov @ torch.linalg.inv(cov + sigma**2 * torch.eye(len(cov), dtype=cov.dtype))
        err_linear = float((xc @ wiener.T - zc).pow(2).mean())
        rows.append(DenoisingRow(sigma, err_model, err_mean, err_shrink, err_linear))
    return rows


def jacobian_asymmetry(model, latents: torch.Tensor, sigma: float = MID_SIGMA, pairs: int = 8, seed: int = 99) -> float:
    """Median over random (u, v) of |<u, Jv> - <Ju, v>| / (|Jv| |u|), J the Jacobian of D at
    x = z + sigma n, by finite differences (agg_kernels.manifold.jvp_finite_difference)."""
    from agg_kernels.manifold import jvp_finite_difference

    g = torch.Generator().manual_seed(seed)
    z = latents[:pairs]
    x = z + sigma * torch.randn(z.shape, generator=g)
    u = torch.randn(z.shape, generator=g)
    v = torch.randn(z.shape, generator=g)
    with torch.no_grad():
        def d(t):
            return denoise(model, t, sigma)
        dx = d(x)
        jv = jvp_finite_difference(d, x, dx, v, sigma)
        ju = jvp_finite_difference(d, x, dx, u, sigma)
    uj = (u * jv).flatten(1).sum(1)
    vj = (ju * v).flatten(1).sum(1)
    ratio = (uj - vj).abs() / (jv.flatten(1).norm(dim=1) * u.flatten(1).norm(dim=1))
    return float(ratio.median())


@dataclass
class JacobianFigures:
    asymmetry: float  # |J - J^T|_F / |J|_F: 0 for a symmetric J, about 1.4 for a random matrix
    off_identity: float  # |J - I|_F / |J|_F: how far the model is from passing x through


def full_jacobian(model, z: torch.Tensor, sigma: float, seed: int = 5, chunk: int = 64) -> torch.Tensor:
    """The whole Jacobian dD/dx (n x n, n = latent elements) at x = z + sigma * noise, by autograd
    (one backward pass per row, batched)."""
    g = torch.Generator().manual_seed(seed)
    x = (z + sigma * torch.randn(z.shape, generator=g))[None]
    n = x[0].numel()
    rows = []
    with torch.inference_mode(False), torch.enable_grad():
        for start in range(0, n, chunk):
            count = min(chunk, n - start)
            xs = x.expand(count, *x.shape[1:]).detach().clone().requires_grad_(True)
            d = denoise(model, xs, sigma)
            basis = torch.zeros(count, n)
            basis[torch.arange(count), torch.arange(start, start + count)] = 1.0
            (gx,) = torch.autograd.grad(d, xs, grad_outputs=basis.view_as(d))
            rows.append(gx.flatten(1).detach())
    return torch.cat(rows)


def full_jacobian_asymmetry(model, z: torch.Tensor, sigma: float = MID_SIGMA) -> JacobianFigures:
    j = full_jacobian(model, z, sigma).double()
    norm = j.norm()
    return JacobianFigures(
        asymmetry=float((j - j.T).norm() / norm),
        off_identity=float((j - torch.eye(len(j), dtype=j.dtype)).norm() / norm),
    )


def manifold_gradient_cosines(model, latents: torch.Tensor, sigmas: Sequence[float] = EVAL_SIGMAS,
                              count: int = 8, seed: int = 7) -> dict[float, float]:
    """Cosine between the finite-difference and the autograd manifold gradients of an L1 loss to a
    different latent (the minimum over `count` samples), per sigma."""
    from agg_kernels.manifold import jvp_finite_difference, vjp_autograd

    g = torch.Generator().manual_seed(seed)
    out = {}
    z = latents[:count]
    target = latents[count : 2 * count]
    for sigma in sigmas:
        x = z + sigma * torch.randn(z.shape, generator=g)

        def d(t, sigma=sigma):
            return denoise(model, t, sigma)

        with torch.no_grad():
            dx = d(x)
        grad_d = torch.sign(dx - target) / dx[0].numel()
        with torch.no_grad():
            fd = jvp_finite_difference(d, x, dx, grad_d, sigma)
        ag = vjp_autograd(d, x, grad_d)
        cos = torch.nn.functional.cosine_similarity(fd.flatten(1), ag.flatten(1), dim=1)
        out[float(sigma)] = float(cos.min())
    return out


@dataclass
class DecoderFigures:
    """Reconstruction MSE per pixel value (0..1 units) of held-back crops through the checkpoint's VAE
    (VAEEncode then VAEDecode, ComfyUI's own code), against trivial reconstructions."""

    model: float
    data_mean: float  # every pixel at the training crops' mean colour
    own_mean: float  # every pixel at the crop's own mean colour (an oracle for the colour)
    count: int

    @property
    def ratio(self) -> float:
        return self.model / self.data_mean


def vae_round_trip(checkpoint: Path, images: torch.Tensor) -> torch.Tensor:
    """VAE.decode(VAE.encode(images)) of a checkpoint through ComfyUI's loader (IMAGE in, IMAGE out)."""
    import comfy.sd

    _, _, vae, _ = comfy.sd.load_checkpoint_guess_config(str(checkpoint), output_vae=True, output_clip=False)
    with torch.inference_mode():
        return vae.decode(vae.encode(images)).float().reshape(images.shape).clone()


def decoder_figures(checkpoint: Path, config: TrainConfig = TrainConfig(), count: int = 64) -> DecoderFigures:
    test = crops(config, "test", count, config.seed)  # the first `count` held-back crops of the evidence data
    train_mean = crops(config, "train", 256, config.seed).mean(dim=(0, 1, 2))
    out = vae_round_trip(checkpoint, test)
    return DecoderFigures(
        model=float((out - test).square().mean()),
        data_mean=float((test - train_mean).square().mean()),
        own_mean=float((test - test.mean(dim=(1, 2), keepdim=True)).square().mean()),
        count=count,
    )


def decoder_preview(checkpoint: Path, path: Path, config: TrainConfig = TrainConfig(), count: int = 8) -> Path:
    """A PNG: held-back crops (top row) and their VAE round trips (bottom row), 2x enlarged."""
    from PIL import Image

    test = crops(config, "test", count, config.seed)
    out = vae_round_trip(checkpoint, test).clamp(0, 1)
    grid = torch.cat([torch.cat(list(test), 1), torch.cat(list(out), 1)], 0)
    img = Image.fromarray(np.round(grid.numpy() * 255).astype(np.uint8))
    img = img.resize((img.width * 2, img.height * 2), Image.NEAREST)
    img.save(path)
    return Path(path)


@dataclass
class Evidence:
    table: list[DenoisingRow]
    asymmetry: float  # |<u,Jv> - <Ju,v>| / (|Jv||u|), finite differences
    jacobian: JacobianFigures  # the whole Jacobian by autograd
    jacobian_random: JacobianFigures  # the same for the random-weight fixture UNet
    cosines: dict[float, float]
    train_seconds: float
    encode_seconds: float
    final_loss: float
    decoder: DecoderFigures | None = None
    decoder_seconds: float = float("nan")

    def format(self) -> str:
        lines = [
            f"trained tiny SD1.5: data encoding {self.encode_seconds:.0f} s, UNet training {self.train_seconds:.0f} s, "
            f"decoder training {self.decoder_seconds:.0f} s, total "
            f"{self.encode_seconds + self.train_seconds + self.decoder_seconds:.0f} s; final loss {self.final_loss:.3f}",
            "denoising MSE per latent element on held-back latents (unit-variance latents):",
            "  sigma   model    mean   shrink  linear  model/best trivial",
        ]
        for r in self.table:
            lines.append(f"  {r.sigma:5.1f}  {r.model:6.3f}  {r.mean:6.3f}  {r.shrink:6.3f}  {r.linear:6.3f}  "
                         f"{r.ratio:.2f}")
        lines.append(f"Jacobian at sigma {MID_SIGMA:g}: |<u,Jv>-<Ju,v>|/(|Jv||u|) = {self.asymmetry:.4f} (finite "
                     f"differences, median of 8); |J-J^T|/|J| = {self.jacobian.asymmetry:.4f}, |J-I|/|J| = "
                     f"{self.jacobian.off_identity:.3f} (autograd; random-weight UNet: "
                     f"{self.jacobian_random.asymmetry:.4f}, {self.jacobian_random.off_identity:.3f})")
        cos = ", ".join(f"sigma {s:g}: {c:.4f}" for s, c in self.cosines.items())
        lines.append(f"finite-difference vs autograd manifold gradient cosine (min of 8): {cos}")
        if self.decoder is not None:
            d = self.decoder
            lines.append(f"VAE round trip of {d.count} held-back crops, MSE per pixel value (0..1): decoder {d.model:.4f}, "
                         f"training mean colour {d.data_mean:.4f} (ratio {d.ratio:.2f}), each crop's own mean colour "
                         f"{d.own_mean:.4f}")
        return "\n".join(lines)


def evidence(files: dict[str, Path]) -> Evidence:
    """The figures that show the trained checkpoint is a denoiser (computed through ComfyUI's loader)."""
    data = load_data(files["data"])
    times_file = timing_path(files["data"])
    times = json.loads(times_file.read_text()) if times_file.exists() else {}
    with torch.inference_mode(False):
        model, _ = load_base(files["checkpoint"])
        random_model, _ = load_base(fixtures.sd15_tiny_checkpoint("taesd"))
        test = data["test_latents"]
        return Evidence(
            table=denoising_table(model, test),
            asymmetry=jacobian_asymmetry(model, test),
            jacobian=full_jacobian_asymmetry(model, test[0]),
            jacobian_random=full_jacobian_asymmetry(random_model, test[0]),
            cosines=manifold_gradient_cosines(model, test),
            encode_seconds=times.get("encode", float("nan")),
            train_seconds=times.get("train", float("nan")),
            final_loss=float(data["losses"][-8:].mean()),
            decoder=decoder_figures(files["checkpoint"]),
            decoder_seconds=times.get("decoder", float("nan")),
        )


def clip_img2img(agg_models, image: str, *, weight: float | None, mask: str | None = None, steps: int = 20,
                 denoise: float = 0.6, seed: int = 3, sampler_name: str = "euler"):
    """A graph on the trained checkpoint: LoadImage `image` -> VAEEncode -> KSampler (`sampler_name`, normal, cfg 1) ->
    VAEDecode (role "decode"), with Apply AGG and CLIP Direction Loss (tiny test CLIP, role "clip"; decoder vae;
    inside LoadImageMask `mask` when given; node defaults otherwise) on the model unless `weight` is None."""
    from agg_testing.graphs import Graph
    from agg_testing.probes import node_defaults

    g = Graph()
    ckpt = g.node("CheckpointLoaderSimple", name="ckpt", ckpt_name=CHECKPOINT_TRAINED)
    pos = g.node("CLIPTextEncode", clip=ckpt[1], text="a photo")
    enc = g.node("VAEEncode", pixels=g.node("LoadImage", image=image)[0], vae=ckpt[2])
    model = ckpt[0]
    if weight is not None:
        extra = {} if mask is None else {"mask": g.node("LoadImageMask", image=mask, channel="red")[0]}
        clip = g.node("AGGCLIPLoader", name="clip", clip_name=agg_models.open_clip, architecture="auto")
        loss = g.node("AGGCLIPDirectionLoss", **{**node_defaults("AGGCLIPDirectionLoss"), "clip": clip[0],
                                                 "vae": ckpt[2], "decoder": "vae", "weight": weight, **extra})
        model = g.node("AGGApply", **{**node_defaults("AGGApply"), "model": ckpt[0], "loss": loss[0]})[0]
    ks = g.node("KSampler", model=model, seed=seed, steps=steps, cfg=1.0, sampler_name=sampler_name, scheduler="normal",
                positive=pos[0], negative=pos[0], latent_image=enc[0], denoise=denoise)
    dec = g.node("VAEDecode", name="decode", samples=ks[0], vae=ckpt[2])
    g.node("PreviewImage", images=dec[0])
    return g


def window_sigmas(patcher, steps: int = 20, denoise: float = 0.6) -> list[float]:
    """The noise levels Apply AGG's default window guides in a KSampler run (normal scheduler) of `steps` at
    `denoise` on the model `patcher`."""
    import comfy.samplers

    from agg_testing.probes import node_defaults, pack_module

    schedule = pack_module("agg_kernels.schedule")
    sigmas = comfy.samplers.calculate_sigmas(patcher.get_model_object("model_sampling"), "normal", int(steps / denoise))
    d = node_defaults("AGGApply")
    window = schedule.edit_window(patcher.model.model_sampling.percent_to_sigma, d["start_percent"], d["end_percent"])
    run = [float(s) for s in sigmas[-(steps + 1):]]
    return [s for s, sn in zip(run[:-1], run[1:], strict=True) if schedule.step_rate(s, sn, window, "eps") > 0]


def at_window_sigmas(patcher, vae, image: torch.Tensor, loss, visit, steps: int = 20,
                     img2img_denoise: float = 0.6) -> list:
    """visit(built, x, d, ctx) at each noise level Apply AGG's default window guides (window_sigmas): `built` is the
    loss node's AGG_LOSS built for a run on the model, x the photo `image` encoded by `vae` and noised to that
    sigma (seeded by the step's index), d the model's clean estimate at x, ctx the step's LossContext (eps).
    Returns the visits' results, one per noise level; the built loss is closed afterwards."""
    from agg_testing.probes import pack_module

    objective, runtime = pack_module("agg_kernels.objective"), pack_module("nodes.runtime")
    model = patcher.model
    with torch.inference_mode(False), torch.no_grad():
        z = model.process_latent_in(vae.encode(image).float()).clone()
    sigmas = window_sigmas(patcher, steps, img2img_denoise)
    info = runtime.RunInfo(model, "eps", torch.device("cpu"), tuple(z.shape), torch.tensor([*sigmas, 0.0]))
    out = []
    try:
        built = loss.build(info)
        for i, sigma in enumerate(sigmas):
            with torch.inference_mode(False):
                x = z + sigma * torch.randn(z.shape, generator=torch.Generator().manual_seed(i))
                with torch.no_grad():
                    d = denoise(model, x, sigma).float()
                ctx = objective.LossContext(sigma=torch.tensor([sigma]), x=x, family="eps", step=i)
                out.append(visit(built, x, d, ctx))
    finally:
        info.close()
    return out
