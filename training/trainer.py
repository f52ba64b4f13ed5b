"""The shared training machinery: optimizers and schedule, EMA, checkpoints and resume, progress, logs.

A loop (``training/tokenizer.py``, ``training/generator.py``) builds its modules, registers them with a
:class:`Trainer` and hands it a ``step_fn(step) -> dict of floats`` that runs one optimisation step through
:meth:`Trainer.backward_step`. The trainer owns everything around it: the learning-rate schedule, EMA of the
main model, gradient clipping, bf16 autocast on CUDA, JSON-lines metrics, a progress bar with loss,
throughput and ETA, periodic checkpoints (``<out>/checkpoints/last.pt``: model, EMA, optimizers, step, elapsed
time, run config) and the wall-clock budget.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from models.registry import config_to_dict
from training.config import OptimConfig, RunConfig, to_dict


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def finished_export(run: RunConfig) -> tuple[Path, int] | None:
    """(export folder, step) of a run in ``run.out_dir`` that already reached ``run.steps`` and exported after
    its last checkpoint, when resuming; None otherwise. Read before any data is loaded, so resuming a finished
    run answers at once."""
    out = Path(run.out_dir)
    ckpt, export = out / "checkpoints" / "last.pt", out / "export" / "config.json"
    if not (run.resume and ckpt.exists() and export.exists()) or export.stat().st_mtime < ckpt.stat().st_mtime:
        return None
    step = int(torch.load(ckpt, map_location="cpu", weights_only=True)["step"])
    return (export.parent, step) if step >= run.steps else None


def setup_run(run: RunConfig) -> torch.device:
    """Threads and seed of a run; returns its device."""
    if run.threads > 0:
        torch.set_num_threads(run.threads)
    torch.manual_seed(run.seed)
    return pick_device(run.device)


def lr_factor(step: int, progress: float, opt: OptimConfig) -> float:
    """Multiplier of the base LR: linear warm-up over ``warmup_steps``, then cosine from 1 to ``min_lr_ratio``
    as ``progress`` goes from the end of warm-up to 1."""
    if opt.warmup_steps > 0 and step < opt.warmup_steps:
        return (step + 1) / opt.warmup_steps
    p = min(max(progress, 0.0), 1.0)
    return opt.min_lr_ratio + (1 - opt.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p))


def adamw(params, opt: OptimConfig) -> torch.optim.AdamW:
    """AdamW with no weight decay on biases, norms, embeddings-like 1-d tensors."""
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": opt.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=opt.lr, betas=opt.betas)


class EMA:
    """Exponential moving average of a model's parameters; buffers (running statistics, constant masks such as
    VAR's ``-inf`` attention bias, where a lerp would give NaN) are copied. The effective decay warms up as
    ``min(decay, (1 + n) / (10 + n))`` so early averages are not dominated by the init."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        params = dict(model.named_parameters())
        for k, v in self.model.named_parameters():
            v.lerp_(params[k].detach().to(v.dtype), 1 - d)
        buffers = dict(model.named_buffers())
        for k, v in self.model.named_buffers():
            v.copy_(buffers[k])

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.model.load_state_dict(sd["model"])
        self.updates = int(sd["updates"])


class Progress:
    """tqdm / rich bar on a terminal, or one plain line per log interval (for nohup logs)."""

    def __init__(self, mode: str, total: int, start: int) -> None:
        if mode == "auto":
            mode = "tqdm" if sys.stderr.isatty() else "log"
        self.mode, self.total, self.start = mode, total, start
        self.bar: Any = None
        if mode == "tqdm":
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, dynamic_ncols=True, unit="step")
        elif mode == "rich":
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
            self.bar.start()
            self.task = self.bar.add_task("train", total=total, completed=start, info="")

    def update(self, step: int, info: dict[str, float], eta_s: float) -> None:
        text = " ".join(f"{k}={v:.4g}" for k, v in info.items())
        if self.mode == "tqdm":
            self.bar.n = step
            self.bar.set_postfix_str(text, refresh=True)
        elif self.mode == "rich":
            self.bar.update(self.task, completed=step, info=text)
        elif self.mode == "log":
            print(f"step {step}/{self.total} {text} eta={_hms(eta_s)}", flush=True)

    def close(self) -> None:
        if self.mode == "tqdm":
            self.bar.close()
        elif self.mode == "rich":
            self.bar.stop()


def _hms(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Trainer:
    """Owns the main model (with EMA), any extra modules (discriminator, aligner), their optimizers and the
    loop. ``optimizers`` maps a name to ``(optimizer, OptimConfig)``; each gets its own schedule."""

    def __init__(self, cfg: Any, model: nn.Module, run: RunConfig, *, extra: dict[str, nn.Module] | None = None) -> None:
        self.cfg, self.run, self.model = cfg, run, model
        self.extra = extra or {}
        self.out = Path(run.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.device = pick_device(run.device)
        self.optimizers: dict[str, tuple[torch.optim.Optimizer, OptimConfig]] = {}
        self.ema = EMA(model, run.ema_decay) if run.ema_decay > 0 else None
        self._clock = time.process_time if run.budget_clock == "cpu" else time.time
        self.step = 0
        self.elapsed = 0.0  # training seconds (of run.budget_clock) over all sessions, resume included
        self.cpu_elapsed = 0.0  # process CPU seconds over all sessions
        self.images_seen = 0
        self._t0 = self._clock()
        self._cpu0 = time.process_time()
        self._last_ckpt_time = time.time()
        self._rewarm_from: int | None = None  # step of a wip resume (optimizer moments restarted there)

    # ------------------------------------------------------------------------------------------- setup

    def add_optimizer(self, name: str, params, opt: OptimConfig) -> torch.optim.Optimizer:
        o = adamw(params, opt)
        for g in o.param_groups:
            g["base_lr"] = opt.lr
        self.optimizers[name] = (o, opt)
        return o

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.device.type == "cuda" and self.run.bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @property
    def progress(self) -> float:
        p = self.step / max(self.run.steps, 1)
        if self.run.max_minutes:
            p = max(p, self.elapsed_now / (60 * self.run.max_minutes))
        return p

    @property
    def elapsed_now(self) -> float:
        return self.elapsed + (self._clock() - self._t0)

    @property
    def cpu_now(self) -> float:
        return self.cpu_elapsed + (time.process_time() - self._cpu0)

    def backward_step(self, name: str, loss: torch.Tensor, params=None) -> float:
        """Backward ``loss``, clip the gradients of optimizer ``name``, step it, zero its grads. Returns the
        pre-clip gradient norm (0 when clipping is off)."""
        o, opt = self.optimizers[name]
        o.zero_grad(set_to_none=True)
        loss.backward()
        norm = 0.0
        if opt.grad_clip > 0:
            ps = [p for g in o.param_groups for p in g["params"]]
            norm = float(torch.nn.utils.clip_grad_norm_(ps, opt.grad_clip))
        o.step()
        o.zero_grad(set_to_none=True)
        return norm

    def _set_lrs(self) -> float:
        lr = 0.0
        rewarm = 1.0
        if self._rewarm_from is not None and self.run.rewarm_steps > 0:
            rewarm = min(1.0, (self.step - self._rewarm_from + 1) / self.run.rewarm_steps)
        for name, (o, opt) in self.optimizers.items():
            f = lr_factor(self.step, self.progress, opt) * rewarm
            for g in o.param_groups:
                g["lr"] = g["base_lr"] * f
            if name == "model":
                lr = o.param_groups[0]["lr"]
        return lr

    # ------------------------------------------------------------------------------------------- checkpoints

    @property
    def ckpt_path(self) -> Path:
        return self.out / "checkpoints" / "last.pt"

    def save_checkpoint(self) -> Path:
        path = self.ckpt_path
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "step": self.step,
            "elapsed": self.elapsed_now,
            "cpu_elapsed": self.cpu_now,
            "images_seen": self.images_seen,
            "model": self.model.state_dict(),
            "model_config": config_to_dict(self.model),
            "ema": self.ema.state_dict() if self.ema else None,
            "extra": {k: m.state_dict() for k, m in self.extra.items()},
            "optimizers": {k: o.state_dict() for k, (o, _) in self.optimizers.items()},
            "run_config": to_dict(self.cfg),
            "torch_rng": torch.get_rng_state(),
        }
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)
        self._last_ckpt_time = time.time()
        return path

    # ------------------------------------------------------------------------------------------- wip folders

    WIP_WEIGHTS = "wip.safetensors"
    WIP_STATE = "wip.json"

    def save_wip(self, folder: str | os.PathLike[str], skip: tuple[str, ...] = ()) -> Path:
        """A compact, committable snapshot for continuing in a later session: the model in float32, the EMA
        in float16 and the extra modules in float32 (``wip.safetensors``; parameters whose names start with
        one of ``skip``, e.g. a frozen pretrained stem, are left out), and the counters (``wip.json``).
        Optimizer moments are not kept: :meth:`maybe_resume` restarts them with ``run.rewarm_steps``."""
        from safetensors.torch import save_file

        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        keep = lambda k: not k.startswith(skip)  # noqa: E731
        tensors = {f"model.{k}": v.detach().float().contiguous().cpu()
                   for k, v in self.model.state_dict().items() if keep(k)}
        if self.ema:
            tensors.update({f"ema.{k}": v.detach().half().contiguous().cpu() if v.is_floating_point() else v.cpu()
                            for k, v in self.ema.model.state_dict().items() if keep(k)})
        for name, m in self.extra.items():
            tensors.update({f"extra.{name}.{k}": v.detach().float().contiguous().cpu() for k, v in m.state_dict().items()})
        save_file(tensors, str(out / self.WIP_WEIGHTS))
        state = {"step": self.step, "elapsed": self.elapsed_now, "cpu_elapsed": self.cpu_now,
                 "images_seen": self.images_seen, "ema_updates": self.ema.updates if self.ema else 0,
                 "model_config": config_to_dict(self.model), "run_config": to_dict(self.cfg)}
        (out / self.WIP_STATE).write_text(json.dumps(state, indent=2) + "\n")
        return out

    def _load_wip(self, folder: Path) -> None:
        from safetensors.torch import load_file

        tensors = load_file(str(folder / self.WIP_WEIGHTS))
        state = json.loads((folder / self.WIP_STATE).read_text())

        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

        def load(module: nn.Module, sd: dict[str, torch.Tensor]) -> None:
            own = module.state_dict()
            unknown = sorted(set(sd) - set(own))
            if unknown:
                raise ValueError(f"{folder}: wip tensors the model does not have: {unknown[:5]}")
            module.load_state_dict({**own, **{k: v.to(own[k].dtype) for k, v in sd.items()}})

        load(self.model, part("model."))
        if self.ema and part("ema."):
            load(self.ema.model, part("ema."))
            self.ema.updates = int(state.get("ema_updates", 0))
        for name, m in self.extra.items():
            load(m, part(f"extra.{name}."))
        self.step = int(state["step"])
        self.elapsed = float(state["elapsed"])
        self.cpu_elapsed = float(state.get("cpu_elapsed", 0.0))
        self.images_seen = int(state.get("images_seen", 0))
        self._rewarm_from = self.step
        self._t0, self._cpu0 = self._clock(), time.process_time()
        self.log({"event": "resume_wip", "from": str(folder), "step": self.step, "elapsed_s": round(self.elapsed, 1)})

    def maybe_resume(self) -> bool:
        """Load ``last.pt`` when ``run.resume`` and it exists, else the wip folder ``run.resume_from`` when
        set; returns whether it did."""
        if self.run.resume and not self.ckpt_path.exists() and self.run.resume_from:
            folder = Path(self.run.resume_from)
            if not (folder / self.WIP_STATE).exists():
                raise FileNotFoundError(f"run.resume_from={folder}: no {self.WIP_STATE} there")
            self._load_wip(folder)
            return True
        if not (self.run.resume and self.ckpt_path.exists()):
            return False
        state = torch.load(self.ckpt_path, map_location="cpu", weights_only=True)
        self.model.load_state_dict(state["model"])
        if self.ema and state.get("ema"):
            self.ema.load_state_dict(state["ema"])
        for k, m in self.extra.items():
            m.load_state_dict(state["extra"][k])
        for k, (o, _) in self.optimizers.items():
            o.load_state_dict(state["optimizers"][k])
        self.step = int(state["step"])
        self.elapsed = float(state["elapsed"])
        self.cpu_elapsed = float(state.get("cpu_elapsed", 0.0))
        self.images_seen = int(state.get("images_seen", 0))
        torch.set_rng_state(state["torch_rng"])
        self._t0, self._cpu0 = self._clock(), time.process_time()
        self.log({"event": "resume", "step": self.step, "elapsed_s": round(self.elapsed, 1)})
        return True

    # ------------------------------------------------------------------------------------------- logging

    def log(self, record: dict[str, Any]) -> None:
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    # ------------------------------------------------------------------------------------------- loop

    @property
    def export_model(self) -> nn.Module:
        """The weights to ship: EMA when kept, else the raw model."""
        return self.ema.model if self.ema else self.model

    def fit(self, step_fn: Callable[[int], dict[str, float]], *, batch_size: int,
            on_sample: Callable[[int], None] | None = None) -> None:
        """Run ``step_fn`` from the current step to ``run.steps`` (or the wall-clock budget)."""
        run = self.run
        (self.out / "config.json").write_text(json.dumps(to_dict(self.cfg), indent=2) + "\n")
        bar = Progress(run.progress, run.steps, self.step)
        window_t, window_n, acc, acc_n = time.time(), 0, {}, 0
        try:
            while self.step < min(run.steps, run.stop_at or run.steps):
                if run.max_minutes and self.elapsed_now >= 60 * run.max_minutes:
                    self.log({"event": "budget_reached", "step": self.step, "elapsed_s": round(self.elapsed_now, 1)})
                    break
                lr = self._set_lrs()
                self.model.train()
                metrics = step_fn(self.step)
                if self.ema:
                    self.ema.update(self.model)
                self.step += 1
                self.images_seen += batch_size
                window_n += batch_size
                for k, v in metrics.items():
                    acc[k] = acc.get(k, 0.0) + float(v)
                acc_n += 1
                if self.step % run.log_every == 0 or self.step == run.steps:
                    dt = time.time() - window_t
                    ips = window_n / max(dt, 1e-9)
                    mean = {k: v / acc_n for k, v in acc.items()}
                    rate_steps = self.step / max(self.progress, 1e-9) - self.step  # steps left at this pace
                    eta = rate_steps * batch_size / max(ips, 1e-9)
                    self.log({"step": self.step, "lr": lr, "img_per_s": round(ips, 2),
                              "elapsed_s": round(self.elapsed_now, 1), "cpu_s": round(self.cpu_now, 1), **{k: round(v, 6) for k, v in mean.items()}})
                    bar.update(self.step, {"loss": mean.get("loss", float("nan")), "img/s": ips, "lr": lr}, eta)
                    window_t, window_n, acc, acc_n = time.time(), 0, {}, 0
                if on_sample and (self.step % run.sample_every == 0):
                    on_sample(self.step)
                if (self.step % run.ckpt_every == 0
                        or time.time() - self._last_ckpt_time >= 60 * run.ckpt_every_minutes):
                    self.save_checkpoint()
        finally:
            bar.close()
        self.save_checkpoint()
        if on_sample:
            on_sample(self.step)
