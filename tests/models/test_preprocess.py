"""One pixel convention: training evaluation, serving (PNG files, /v2 IMAGE) and export give the same uint8.

A decoded tensor goes through each path that turns model output into pixels; all must agree exactly, including
at the rounding ties and outside [-1, 1] (issue 19, item 5).
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

import models
from export.parts import build_part
from models.latent_norm import denormalize_latents, normalize_latents
from models.preprocess import to_model_input, to_uint8, to_uint8_nchw, uint8_to_float
from server.codecs import encode_images
from training.data import to_float
from training.data import to_uint8 as train_to_uint8
from training.evaluate import reconstruct


def _png_pixels(images: torch.Tensor) -> np.ndarray:
    """The serving path: the decode route's PNG files, read back. (B, H, W, 3) uint8."""
    return np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in encode_images(images, "png")])


def _hard_tensor() -> torch.Tensor:
    """(2, 3, 8, 8) float32 in about [-1.2, 1.2], with every exact half-way value (k + 0.5) / 127.5 - 1 that
    float32 holds, so truncation and round-half-up conventions would differ from round-half-to-even."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 8, 8, generator=g) * 2.4 - 1.2
    ties = torch.tensor([-1.0, 1.0, 0.0, 1.0 / 255, -1.0 / 255, 3.0 / 255, 1.0 / 127.5 - 1, 254.5 / 127.5 - 1])
    x[0, 0, 0] = ties
    return x


def test_to_uint8_rounds_half_to_even_and_clamps():
    x = torch.tensor([-1.5, -1.0, 1.0 / 255 - 1.0, 1.0 / 255, 0.0, 1.0, 1.5]).view(1, 1, 1, 7).expand(1, 3, 1, 7)
    got = to_uint8_nchw(x)[0, 0, 0].tolist()
    ref = [min(255, max(0, round((float(v) + 1.0) * 127.5))) for v in x[0, 0, 0].double()]  # Python round: half-even
    assert got == ref
    assert got[0] == 0 and got[-1] == 255 and got[4] == 128  # 127.5 rounds to the even 128


def test_to_uint8_layouts_are_one_function():
    x = _hard_tensor()
    assert torch.equal(torch.from_numpy(to_uint8(x)), to_uint8_nchw(x).permute(0, 2, 3, 1))
    assert torch.equal(train_to_uint8(x), to_uint8_nchw(x))


def test_uint8_round_trip_is_exact_and_shared():
    u = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(1, 3, 16, 16).contiguous()
    assert torch.equal(to_uint8_nchw(uint8_to_float(u)), u)
    assert torch.equal(to_float(u), to_model_input(u.permute(0, 2, 3, 1).numpy()))  # training input == serving input


def test_training_evaluation_serving_and_export_give_identical_pixels():
    torch.manual_seed(0)
    tok = models.create_model("softvq-tiny-64").eval()
    size = tok.config.image_size
    images = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8)
    with torch.no_grad():
        tokens = tok.encode(to_float(images))
        decoded = tok.decode(tokens)                                      # (B, 3, H, W) float, not clamped
        exported = build_part(tok, "decoder")[0](tokens)                  # the module export traces
    assert torch.equal(exported, decoded)
    train_eval = reconstruct(tok, images, batch_size=2)                   # training evaluation: (B, 3, H, W) uint8
    serving_png = _png_pixels(decoded)                                    # decode route, png
    serving_v2 = to_uint8(decoded)                                        # /v2 IMAGE output
    export_px = to_uint8(exported)
    assert train_eval.dtype == torch.uint8
    np.testing.assert_array_equal(train_eval.permute(0, 2, 3, 1).numpy(), serving_png)
    np.testing.assert_array_equal(serving_png, serving_v2)
    np.testing.assert_array_equal(serving_v2, export_px)
    # the hard values (ties, out of range) agree across the paths too
    hard = _hard_tensor()
    np.testing.assert_array_equal(train_to_uint8(hard).permute(0, 2, 3, 1).numpy(), _png_pixels(hard))


def test_latent_normalisation_is_shared():
    tok = models.create_model("softvq-tiny-64")
    z = torch.randn(2, 4, 3)
    m, s = 0.25, 0.5
    assert torch.allclose(normalize_latents(z, m, s), (z - m) / s)
    assert torch.allclose(denormalize_latents(normalize_latents(z, m, s), m, s), z, atol=1e-6)
    c = tok.config
    assert torch.equal(tok.normalize_latents(z), normalize_latents(z, c.vq_mean, c.vq_std))
    assert torch.equal(tok.denormalize_latents(z), denormalize_latents(z, c.vq_mean, c.vq_std))


def test_serving_denormalises_generator_latents_as_evaluation_does():
    """The server's tokenizer runtime turns sampler output (float64 on the CPU) into tokens with the same
    function and dtype as ``training.evaluate`` (``tokenizer.denormalize_latents(res.float())``): bit-equal."""
    from server.engine.runtime import build_runtimes
    from server.engine.specs import resolve_models
    from server.settings import Settings

    folder = "weights/default/tokenizer"
    spec = resolve_models([folder]).tokenizer(None)
    runtime = build_runtimes([spec], Settings())[spec.name]
    tok = models.load_pretrained(folder)
    x = torch.randn(3, *tok.token_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 1.7
    assert tok.config.vq_std != 1.0 or tok.config.vq_mean != 0.0
    assert torch.equal(runtime.denormalize(x), tok.denormalize_latents(x.float()))
