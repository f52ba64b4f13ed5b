"""A generator family that exists only in this module is served over real HTTP without a line of ``server/``.

The family ("toy") is registered the way any new one would be: a model class and a named configuration in the
model registry, and a step sampler in the sampler registry (``models.sampling.register_sampler``). Its
sampler is deliberately unlike the built-in ones (an annealed pull towards a class-conditioned target, with
classifier-free guidance inside a guidance interval), so the server can only serve it by reading the
registries: ``/v1/models`` describes it, validation takes its sampler names and defaults from them, warm-up
and the step-level scheduler run it, and the images come back decoded by the paired tokenizer.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import httpx
import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image
from server_testkit import ThreadServer

from models.registry import register_config, register_model_class, unregister
from models.sampling import SampleRequest, StepStats, register_sampler, run_to_completion, unregister_sampler
from models.sampling.base import Row
from models.surface import GeneratorConfigBase, SampleSpec

NAME = "toy-gen-64x32"
TOKENIZER = "softvq-tiny-64"  # (64, 32) float tokens, as the toy makes


@dataclass(frozen=True)
class ToyConfig(GeneratorConfigBase):
    """A toy class-conditional generator of (num_tokens, token_dim) latents; ``rounds`` is its step count."""

    family: ClassVar[str] = "toy"

    num_tokens: int = 64
    token_dim: int = 32
    rounds: int = 4
    tokenizer: str = TOKENIZER
    cfg_scale: float = 2.0
    guidance_high: float = 0.75

    def __post_init__(self) -> None:
        problems = self.check_base()
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def sampler(self) -> str:
        return "anneal"

    @property
    def steps(self) -> int:
        return self.rounds

    def sample_spec(self) -> SampleSpec:
        return SampleSpec((self.num_tokens, self.token_dim), "float32")

    def sampling_extras(self) -> dict[str, Any]:
        return {"rounds": self.rounds}


class ToyGenerator(nn.Module):
    """``forward(x (N, L, D), labels (N,) int64) -> target (N, L, D)``: a per-class offset plus a linear map
    of the current latents (``num_classes`` is the unconditional label)."""

    config_class = ToyConfig

    def __init__(self, config: ToyConfig) -> None:
        super().__init__()
        self.config = config
        self.label = nn.Embedding(config.num_classes + 1, config.token_dim)
        self.mix = nn.Linear(config.token_dim, config.token_dim)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.mix(x) + self.label(labels)[:, None, :]


class AnnealSampler:
    """Step k of n moves each row a fraction 1 / (n - k) of the way to the model's guided target; the noise is
    the row's own. Guidance (``cfg_scale``) applies while the progress k / n lies in the row's interval."""

    name = "anneal"

    def __init__(self, config: ToyConfig, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        self.null_class = config.null_class
        self.device = torch.device(device)
        self.dtype = dtype

    def init_row(self, request: SampleRequest, shape: tuple[int, ...]) -> Row:
        g = torch.Generator(device="cpu").manual_seed(request.seed)
        x = torch.randn(tuple(shape), generator=g, dtype=torch.float32).to(self.device, torch.float64)
        return Row(request, x, g, total=request.steps)

    def result(self, row: Row) -> torch.Tensor:
        return row.x

    @torch.no_grad()
    def step(self, model: Any, rows: Sequence[Row]) -> StepStats:
        stats = StepStats(rows=len(rows))
        if not rows:
            return stats
        guided = [i for i, r in enumerate(rows) if r.request.cfg_scale > 1
                  and r.request.guidance_low <= r.step / r.total <= r.request.guidance_high]
        x = torch.stack([r.x for r in rows] + [rows[i].x for i in guided]).to(self.dtype)
        labels = torch.tensor([r.request.class_id for r in rows] + [self.null_class] * len(guided),
                              device=self.device)
        out = model(x, labels).to(torch.float64)
        stats.model_rows, stats.uncond_rows, stats.forwards = x.shape[0], len(guided), 1
        target = out[: len(rows)].clone()
        for j, i in enumerate(guided):
            uncond = out[len(rows) + j]
            target[i] = uncond + rows[i].request.cfg_scale * (target[i] - uncond)
        for i, r in enumerate(rows):
            r.x = r.x + (target[i] - r.x) / (r.total - r.step)
            r.step += 1
        return stats


def _build(name: str, config: ToyConfig, *, device: torch.device | str = "cpu",
           dtype: torch.dtype = torch.float32) -> AnnealSampler:
    return AnnealSampler(config, device=device, dtype=dtype)


@pytest.fixture(scope="module")
def server() -> Iterator[ThreadServer]:
    register_model_class(ToyGenerator)
    register_config(NAME, ToyGenerator, ToyConfig, "toy generator of this test module")
    register_sampler("toy", samplers=("anneal",), build=_build, model_input="module")
    try:
        with ThreadServer(models=[TOKENIZER, NAME], max_wait_ms=50, max_batch_size=8) as s:
            yield s
    finally:
        unregister_sampler("toy")
        unregister(NAME)


def test_models_describes_the_toy_from_the_registries(server: ThreadServer) -> None:
    info = {m["name"]: m for m in httpx.get(f"{server.url}/v1/models").json()["models"]}[NAME]
    assert info["kind"] == "generator" and info["family"] == "toy" and info["tokenizer"] == TOKENIZER
    assert info["samplers"] == ["anneal"] and info["token_shape"] == [64, 32] and info["token_dtype"] == "float32"
    assert info["defaults"] == {"sampler": "anneal", "steps": 4, "cfg_scale": 2.0, "guidance_interval": [0.0, 0.75],
                                "path_type": "linear", "rounds": 4}
    assert info["classes"] == list(range(1000)) and info["num_classes"] == 1000


def test_generate_serves_the_toy_rows_as_its_sampler_makes_them(server: ThreadServer) -> None:
    body = {"model": NAME, "class": 207, "seed": 11, "num_images": 3, "steps": 6, "return_latents": True}
    r = httpx.post(f"{server.url}/v1/generate", json=body, timeout=120)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["steps"] == 6 and out["sampler"] == "anneal" and out["cfg_scale"] == 2.0
    assert len(out["images"]) == 3
    latents = np.asarray(out["latents"]["data"], dtype=np.float32).reshape(out["latents"]["shape"])
    assert latents.shape == (3, 64, 32)

    # The same rows sampled here, with the served weights: the server added nothing of its own.
    module = server.state.engine.runtimes[NAME].module
    reqs = [SampleRequest(class_id=207, seed=11 + i, steps=6, cfg_scale=2.0, guidance_low=0.0, guidance_high=0.75,
                          sampler="anneal") for i in range(3)]
    want = run_to_completion(AnnealSampler(module.config), module, reqs, (64, 32)).float().numpy()
    np.testing.assert_allclose(latents, want, rtol=0, atol=1e-5)

    tok = server.state.engine.runtimes[TOKENIZER]
    pixels = tok.decode(torch.from_numpy(want)).clamp(-1, 1)
    first = np.asarray(Image.open(io.BytesIO(base64.b64decode(out["images"][0]["data"]))))
    expected = ((pixels[0].permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255)
    assert first.shape == (64, 64, 3) and np.abs(first.astype(np.float64) - expected).max() <= 1


def test_validation_reads_the_toy_registration(server: ThreadServer) -> None:
    bad = httpx.post(f"{server.url}/v1/generate", json={"model": NAME, "class": 1, "sampler": "sde"}, timeout=60)
    assert bad.status_code == 422 and "anneal" in bad.json()["error"]["message"], bad.text
    ok = httpx.post(f"{server.url}/v1/generate", json={"model": NAME, "class": 1, "seed": 0}, timeout=120)
    assert ok.status_code == 200 and ok.json()["steps"] == 4, ok.text
