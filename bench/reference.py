"""Issue 10's reference figures (the official implementation run as published on the lent H100, torch 2.11,
CUDA 13, random weights, batch 64, medians after warm-up) and tokserve's targets, to print beside ours."""

from __future__ import annotations

from dataclasses import dataclass

REFERENCE_PEAK_TFLOPS = 686.0  # 8192^3 bf16 torch.mm on the lent H100, the MFU denominator


@dataclass(frozen=True)
class Reference:
    """One row of issue 10's table. ``value`` is in ``unit`` (img/s or ms); ``target`` likewise."""

    key: str
    work: str
    precision: str
    value: float | None
    unit: str
    target: float | None = None
    gflop: float | None = None
    note: str = ""

    def text(self) -> str:
        ref = "none exists" if self.value is None else f"{self.value:g} {self.unit}"
        tgt = "" if self.target is None else f"; target {'<=' if self.unit == 'ms' else '>='} {self.target:g} {self.unit}"
        return f"ref {ref} ({self.precision}){tgt}"


REFERENCES: tuple[Reference, ...] = (
    Reference("encode/softvq-l-64", "softvq-l-64 encode, 256 px", "bf16 autocast", 824, "img/s", 1700, 204.5,
              "24.6% MFU"),
    Reference("decode/softvq-l-64", "softvq-l-64 decode, 256 px", "bf16 autocast", 849, "img/s", 1700, 204.4,
              "25.3% MFU"),
    Reference("encode/softvq-bl-64", "softvq-bl-64 encode, 256 px", "bf16 autocast", 2162, "img/s", 4500, 58.7),
    Reference("denoiser/sit-xl@128", "SiT-XL/1, 64 tokens x 32, one forward at batch 128", "fp16 + torch.compile",
              21.5, "ms", 14.0, 58.07, "50.5% MFU; target >= 75% MFU"),
    Reference("generate/sde", "SiT-XL/1 250 SDE steps, cfg 1.75 on [0, 0.7], softvq-l-64 decode",
              "fp16 + torch.compile", 12.1, "img/s", 20.0, 24700.0, "43.7% MFU; target >= 72% MFU"),
    Reference("generate/sde/bf16-eager", "the same", "bf16 eager", 8.8, "img/s"),
    Reference("generate/sde/fp32", "the same", "fp32 (official evaluation setting)", 1.56, "img/s"),
    Reference("generate/sde/official-script", "the official script as written (doubles the batch twice)",
              "fp16 eager", 4.8, "img/s", note="estimated from measured forwards"),
    Reference("generate/sde/paper-mi250", "paper: SiT-XL on SoftVQ-BL-64, AMD MI250, batch 64", "fp32", 5.42,
              "img/s", note="the 18x / 55x speed-ups were measured in this setting"),
    Reference("generate/http", "the same generation through the HTTP server at concurrency 64-256", "-", None,
              "img/s", note="target >= 90% of the engine-only figure"),
)

BY_KEY = {r.key: r for r in REFERENCES}


def lookup(key: str) -> Reference | None:
    return BY_KEY.get(key)


def reference_table() -> str:
    """Issue 10's table as fixed-width text."""
    lines = ["issue 10 reference figures (official code, lent H100, torch 2.11, random weights, batch 64):"]
    for r in REFERENCES:
        gf = "" if r.gflop is None else f" [{r.gflop:g} GFLOP/img]"
        extra = f" -- {r.note}" if r.note else ""
        lines.append(f"  {r.work}{gf}: {r.text()}{extra}")
    lines.append(f"  bf16 matmul ceiling, 8192^3 torch.mm: {REFERENCE_PEAK_TFLOPS:g} TFLOP/s (the MFU denominator)")
    return "\n".join(lines)
