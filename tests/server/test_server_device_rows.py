"""Device-resident generation (issue 17 item 2): the SiT / DiT step samplers keep their rows, generators and
numbers on the runtime's device, the runtime's ``model_fn`` takes and returns device tensors, and the
generation loop copies a finished row back to the host once, before decoding.

On the CPU nothing is really copied, so the test watches the calls that *would* copy to the host (or wait for
the device) on an accelerator, through a ``TorchFunctionMode`` around the engine's device-thread function
(``GenerateLoop._step_and_decode``: scheduler, sampler, guidance, runtime, model): ``.cpu()``, ``.tolist()``,
``.item()``, ``.numpy()`` and ``bool`` / ``int`` / ``float`` / ``index`` of a tensor anywhere, and ``.to(<cpu>)``
called from tokserve's sampling and engine code. On a CPU run a ``.to(<cpu>)`` cannot be told from a move to
the runtime's device; inside the network (``models/dit.py`` moves a constant to ``t.device``: host to device
on CUDA) it is the latter, and the sampling / engine code makes no such call when a tensor is already there.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.overrides import TorchFunctionMode

import server.engine.loops as loops
from models.sampling import get_sampler, run_to_completion
from models.sampling.base import SampleRequest
from server.engine.batching import BatchPolicy
from server.engine.loops import GenerateLoop
from server.engine.runtime import DeviceThread, GeneratorRuntime, TokenizerRuntime, load_module
from server.engine.specs import resolve_models
from server.metrics import Metrics
from server.queue import GeneratePayload, Job
from server.queue.memory import InProcessQueue
from server.settings import Settings

SYNCING = {"cpu", "tolist", "item", "numpy", "__bool__", "__int__", "__float__", "__index__"}
WATCHED = tuple(str(Path(__file__).resolve().parents[2] / d) + os.sep
                for d in ("models/sampling", "server"))  # where a .to(<cpu>) counts


def _targets_cpu(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether ``Tensor.to(*args, **kwargs)`` names the CPU as its device."""
    dev = kwargs.get("device")
    for a in args[1:]:
        if isinstance(a, str | torch.device):
            dev = a
        elif isinstance(a, torch.Tensor):
            dev = a.device
    return dev is not None and torch.device(dev).type == "cpu"


class HostCopies(TorchFunctionMode):
    """Records, while active, every tensor call that copies to the host or reads a device value, and whether it
    came before or after the loop's copy-back of finished rows (``to_host``)."""

    def __init__(self) -> None:
        super().__init__()
        self.before: list[str] = []
        self.after: list[str] = []
        self.copied_back = False

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in SYNCING or (name == "to" and _targets_cpu(args, kwargs)
                               and sys._getframe(1).f_code.co_filename.startswith(WATCHED)):
            caller = sys._getframe(1)
            where = f"{name} at {Path(caller.f_code.co_filename).name}:{caller.f_lineno}"
            (self.after if self.copied_back else self.before).append(where)
        return func(*args, **kwargs)


@pytest.fixture(scope="module")
def runtimes() -> dict[str, Any]:
    settings = Settings()
    ms = resolve_models(["softvq-tiny-64", "sit-tiny-64x32", "dit-tiny-64x32"])
    out: dict[str, Any] = {}
    for name, spec in ms.specs.items():
        cls = TokenizerRuntime if spec.kind == "tokenizer" else GeneratorRuntime
        out[name] = cls(spec, load_module(spec, settings), torch.device("cpu"), torch.float32)
    return out


def _loop(runtimes: dict[str, Any], generator: str) -> GenerateLoop:
    gen = runtimes[generator]
    return GenerateLoop(gen, runtimes[gen.spec.tokenizer], InProcessQueue(8), DeviceThread(),
                        BatchPolicy(max_rows=8, max_wait_s=0.0), Metrics())


def _job(sampler: str, steps: int, n: int, seed: int) -> Job:
    reqs = [SampleRequest(class_id=3 + i, seed=seed + i, steps=steps, cfg_scale=(1.0, 2.5, 4.0)[i % 3],
                          guidance_low=0.0, guidance_high=(1.0, 0.6)[i % 2], sampler=sampler,
                          path_type=("linear", "cosine")[i % 2])
            for i in range(n)]
    return Job(model="gen", payload=GeneratePayload(reqs), request_id=f"{sampler}-{seed}")


@pytest.mark.parametrize(("generator", "sampler"), [("sit-tiny-64x32", "sde"), ("sit-tiny-64x32", "heun"),
                                                    ("dit-tiny-64x32", "ddpm")])
def test_a_step_copies_nothing_to_the_host_and_finished_rows_come_back_once(
        runtimes: dict[str, Any], generator: str, sampler: str, monkeypatch: pytest.MonkeyPatch) -> None:
    loop = _loop(runtimes, generator)
    # two jobs of different lengths (the short one finishes while the other runs) and one that joins late
    loop.scheduler.admit(_job(sampler, 4, 3, seed=10))
    loop.scheduler.admit(_job(sampler, 3, 2, seed=20))
    copy_backs: list[int] = []
    real_to_host = loops.to_host
    mode = HostCopies()

    def counted_to_host(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        copy_backs.append(len(tensors))
        mode.copied_back = True
        return real_to_host(tensors)

    monkeypatch.setattr(loops, "to_host", counted_to_host)
    finished = []
    for step in range(5):
        if step == 1:
            loop.scheduler.admit(_job(sampler, 3, 1, seed=30))
        mode.copied_back = False
        with mode:
            result = loop._step_and_decode()
        assert not result.failed
        assert mode.before == [], f"step {step + 1} copied to the host: {mode.before}"
        finished += [job.request_id for job, *_ in result.finished]
        for _, images, tokens, _ in result.finished:
            assert images.device.type == "cpu" and tokens.device.type == "cpu"
    assert sorted(finished) == sorted(f"{sampler}-{s}" for s in (10, 20, 30))
    assert copy_backs == [1, 2]  # the short job after step 3; the long and the late one together after step 4
    assert len(loop.scheduler) == 0


def test_make_sampler_puts_a_model_fn_familys_rows_on_the_runtime_device(runtimes: dict[str, Any]) -> None:
    rt = runtimes["sit-tiny-64x32"]
    sampler = rt.make_sampler("sde")
    assert sampler.device == rt.device
    row = sampler.init_row(SampleRequest(class_id=1, seed=0, steps=2), rt.spec.token_shape)
    assert row.x.device.type == rt.device.type and row.generator.device.type == rt.device.type
    out = rt.model_fn(row.x[None].float(), torch.ones(1), torch.ones(1, dtype=torch.long))
    assert out.device.type == rt.device.type and out.dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["sde", "ddpm"])
def test_on_cuda_rows_stay_there_and_a_seed_repeats_on_the_same_device(runtimes: dict[str, Any], name: str) -> None:
    model = runtimes["dit-tiny-64x32" if name == "ddpm" else "sit-tiny-64x32"].module
    cuda = torch.device("cuda")
    sampler = get_sampler(name, model.config, device=cuda)
    gpu = model.to(cuda)

    def model_fn(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        assert x.is_cuda and t.is_cuda and y.is_cuda
        return gpu(x, t, y)

    reqs = [SampleRequest(class_id=5, seed=s, steps=3, cfg_scale=2.0, sampler=name) for s in (1, 2)]
    a = run_to_completion(sampler, model_fn, reqs, (64, 32))
    b = run_to_completion(sampler, model_fn, reqs, (64, 32))
    model.to("cpu")
    assert a.is_cuda and torch.equal(a, b)  # same seed, same device: same result (CPU streams differ)
