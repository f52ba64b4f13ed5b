"""All server settings, parsed once from environment variables (prefix ``TOKSERVE_``).

    TOKSERVE_MODELS=softvq-tiny-64,sit-tiny-64x32        # registry names (random weights) and/or folders
    TOKSERVE_MODELS=tok=weights/default/tokenizer,weights/default/generator   # ``name=folder`` names a folder
    TOKSERVE_DEVICE=cuda TOKSERVE_MAX_BATCH_SIZE=64 TOKSERVE_API_KEYS=key1,key2

List settings (``MODELS``, ``API_KEYS``) are comma-separated. ``REDIS_URL`` (or ``TOKSERVE_REDIS_URL``)
selects the Redis Streams queue backend; unset means the in-process queue with an embedded worker.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

log = logging.getLogger("tokserve.settings")

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_WEIGHTS = REPO_ROOT / "weights" / "default"
# Served with random weights when no trained default exists (tests, first start on a fresh clone).
FALLBACK_MODELS = ("softvq-tiny-64", "sit-tiny-64x32")


def _split(v: object) -> object:
    if isinstance(v, str):
        return [s.strip() for s in v.split(",") if s.strip()]
    return v


def default_export_dir() -> str:
    """The content-addressed export cache of ``TOKSERVE_EXPORT_DIR``'s default: ``$XDG_CACHE_HOME/tokserve/exports``
    (``~/.cache/tokserve/exports``)."""
    import os

    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base) / "tokserve" / "exports")


class Settings(BaseSettings):
    """The one settings object of a tokserve process (API and/or worker)."""

    model_config = SettingsConfigDict(env_prefix="TOKSERVE_", extra="ignore", validate_default=True,
                                      allow_inf_nan=False)

    # ---- models
    models: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Models to load: registry names (random weights) or folders (config.json + safetensors), "
        "optionally `name=folder`. Empty: the shipped weights/default/{tokenizer,generator} (then the other weights/default folders), else tiny random "
        "configurations.",
    )
    default_tokenizer: str | None = Field(None, description="Tokenizer used when a request names none.")
    default_generator: str | None = Field(None, description="Generator used when a request names none.")
    device: str = Field("auto", description="`auto` (cuda when available), `cpu`, `cuda`, `cuda:1` ...")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Model compute dtype: `auto` (bfloat16 on CUDA, float32 on the CPU), `float32`, "
        "`bfloat16` or `float16` (weights cast, the time embedder and soft quantizer kept float32; CPU too).")
    allow_pickle: bool = Field(False, description="Allow pickle checkpoints, read with torch.load(weights_only=True) "
                               "(tensors and plain containers only; anything else is refused).")
    unsafe_unpickle_runs_code: bool = Field(
        False, description="DANGER: with allow_pickle, fully unpickle checkpoints the safe loader refuses; a crafted "
        "checkpoint then runs code in this process. Only for checkpoints you made yourself.")
    warmup: bool = Field(True, description="Run every model once before reporting ready.")
    torch_threads: int | None = Field(None, ge=1, description="torch.set_num_threads for the worker.")
    runtime: str = Field(
        "auto",
        description="Model runtime (models.runtime runners): `auto` (CUDA: bf16 + torch.compile + CUDA graphs; "
        "CPU: eager torch, or ONNX Runtime where a recorded measurement found it faster for that model and "
        "batch size, unless `attention=exact` or `batch_invariant`), `torch` (eager), `torch-compile`, "
        "`torchscript` or `onnx` (onnxruntime: CUDA provider with onnxruntime-gpu, else CPU); per model: "
        "`torch,default-tokenizer=onnx`.",
    )
    attention: Literal["sdpa", "exact"] = Field(
        "sdpa",
        description="Attention form of every model: `sdpa` (fused `scaled_dot_product_attention`, faster) or "
        "`exact` (the explicit `softmax(q k^T * scale) v` of the official SoftVQ / SiT / DiT code: fp32 outputs "
        "on the CPU are bit-identical to the reference implementation; SDPA differs by ~1e-6 reordering noise).",
    )
    batch_invariant: bool = Field(
        False,
        description="A row's result never depends on its batch-mates, bit for bit. Parts served by ONNX Runtime on "
        "the CPU (what `TOKSERVE_RUNTIME=auto` picks for the shipped tokenizer and SiT) are batch-invariant by "
        "construction, at no cost; this setting also runs every other tokenizer and SiT / DiT model call (PyTorch) "
        "one row at a time (batching, queueing and metrics unchanged). Off by default because of that cost: on the "
        "CPU it made PyTorch encode at batch 8 about 5x slower (bench/README.md); PyTorch rows differ across batch "
        "sizes by ~1e-6 (a pixel level now and then). On CUDA it is not a guarantee (bf16 / split-K GEMMs).",
    )
    export_dir: str | None = Field(
        default_factory=lambda: default_export_dir(),
        description="Where `torchscript` / `onnx` runtimes (and `auto` where it picks ONNX Runtime) keep their "
        "exports, content-addressed (`<dir>/<model>-<runtime>/<hash of weights, config, options, "
        "torch/onnx/onnxruntime versions>`): a restart with unchanged weights reuses the export instead of "
        "exporting again. Default: `$XDG_CACHE_HOME/tokserve/exports` (`~/.cache/tokserve/exports`); an empty "
        "value exports into a fresh temporary folder on every start.",
    )

    # ---- batching and queue
    max_batch_size: int = Field(32, ge=1, description="Rows per model call (1 disables batching).")
    max_wait_ms: float = Field(5.0, ge=0, description="How long a partial encode/decode batch waits to fill.")
    queue_capacity: int = Field(256, ge=1, description="Jobs waiting per (operation, model) before 429.")
    default_deadline_s: float = Field(300.0, gt=0, description="Deadline of a request without x-deadline-ms.")
    idempotency_ttl_s: float = Field(600.0, ge=0, description="How long results are kept for Idempotency-Key.")
    redis_url: str | None = Field(
        None,
        validation_alias=AliasChoices("TOKSERVE_REDIS_URL", "REDIS_URL"),
        description="Redis Streams queue backend (separate worker processes); unset: in-process queue.",
    )
    job_ttl_s: float = Field(3600.0, gt=0, description="How long finished jobs (status, events, results) are "
                             "kept for GET /v1/jobs/{id}; also the TTL of Redis results.")

    # ---- Redis Streams backend and standalone workers (used only with REDIS_URL)
    redis_prefix: str = Field("tokserve", min_length=1, description="Prefix of every Redis key.")
    redis_reclaim_s: float = Field(30.0, gt=0, description="A job held this long by a worker that stopped "
                                   "refreshing it (dead) is reclaimed by another worker.")
    redis_max_deliveries: int = Field(3, ge=1, description="Deliveries (model errors or worker deaths) before "
                                      "a job goes to the dead-letter stream and its caller gets 500.")
    redis_stream_maxlen: int = Field(100_000, ge=1000, description="Approximate cap of each job stream (XADD "
                                     "MAXLEN ~); acknowledged entries are trimmed sooner.")
    redis_connect_timeout_s: float = Field(0.5, gt=0, description="Redis connect timeout (fast 503 when down).")
    redis_timeout_s: float = Field(2.0, gt=0, description="Redis command timeout (blocking reads get more).")
    worker_heartbeat_s: float = Field(2.0, gt=0, description="How often a worker refreshes its announcement; "
                                      "it is gone (not ready) after 3 missed beats.")
    worker_id: str | None = Field(None, description="Worker name in Redis (default: host-pid-random).")
    metrics_port: int | None = Field(None, ge=1, le=65535, description="Standalone worker: serve Prometheus "
                                     "/metrics on this port.")

    # ---- limits
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024, description="Largest accepted request body.")
    max_image_pixels: int = Field(4096 * 4096, ge=1, description="Largest accepted image (width x height).")
    max_request_pixels: int = Field(4 * 4096 * 4096, ge=1, description="Most pixels of all the images of one "
                                    "request (413 above; read from the headers before decoding).")
    max_decode_pixels: int = Field(2 * 4096 * 4096, ge=1, description="Pixels of large requests (over 1 MP) being "
                                   "decoded at once, all requests together (429 above; one request alone may "
                                   "always use it).")
    max_images_per_request: int = Field(64, ge=1, description="Most images (rows) in one request.")
    max_steps: int = Field(1000, ge=1, description="Most denoising steps a request may ask for.")
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="Accepted `Authorization: Bearer` keys; empty: no authentication."
    )
    retry_after_s: int = Field(1, ge=0, description="Retry-After sent with 429 and 503.")

    # ---- codecs and process
    codec_threads: int = Field(2, ge=1, description="Threads decoding/encoding images off the event loop.")
    jpeg_quality: int = Field(90, ge=1, le=100)
    webp_quality: int = Field(90, ge=1, le=100)
    png_compress_level: int = Field(3, ge=0, le=9)
    shutdown_grace_s: float = Field(30.0, ge=0, description="How long shutdown waits for accepted work.")

    @field_validator("export_dir", mode="before")
    @classmethod
    def _empty_export_dir(cls, v: object) -> object:
        return None if isinstance(v, str) and not v.strip() else v

    @field_validator("models", mode="before")
    @classmethod
    def _comma_lists(cls, v: object) -> object:
        return _split(v)

    @field_validator("api_keys", mode="before")
    @classmethod
    def _keys(cls, v: object) -> object:
        """Blank (unset) means no authentication; anything else must be a comma list of non-empty keys, so a
        value such as " , " or "key1,,key2" fails start-up instead of silently turning authentication off."""
        if isinstance(v, str):
            if not v.strip():
                return []
            keys = [k.strip() for k in v.split(",")]
            if not all(keys):
                raise ValueError("TOKSERVE_API_KEYS holds an empty key (a stray comma?): give a comma list of "
                                 "non-empty keys, or leave it unset for no authentication")
            return keys
        if isinstance(v, list) and not all(str(k.get_secret_value() if isinstance(k, SecretStr) else k).strip()
                                           for k in v):
            raise ValueError("api_keys holds an empty key")
        return v

    @model_validator(mode="after")
    def _defaults(self) -> Settings:
        if not self.models:
            self.models = default_models()
        if self.unsafe_unpickle_runs_code and not self.allow_pickle:
            raise ValueError("unsafe_unpickle_runs_code needs allow_pickle")
        return self

    def api_key_values(self) -> list[bytes]:
        return [k.get_secret_value().encode() for k in self.api_keys]


def default_models() -> list[str]:
    """The shipped trained models when present (``weights/default/tokenizer`` and ``generator`` first, so they
    are the defaults, then every other folder of ``weights/default`` with a config.json, e.g. ``mar``), else
    tiny random configurations (with a loud warning)."""
    tok, gen = DEFAULT_WEIGHTS / "tokenizer", DEFAULT_WEIGHTS / "generator"
    if (tok / "config.json").exists() and (gen / "config.json").exists():
        extra = sorted(p for p in DEFAULT_WEIGHTS.iterdir()
                       if p.is_dir() and p not in (tok, gen) and (p / "config.json").exists())
        return [str(tok), str(gen), *map(str, extra)]
    log.warning(
        "!!! no trained default models under %s: serving %s with RANDOM WEIGHTS (outputs are noise). "
        "Set TOKSERVE_MODELS to choose models. !!!",
        DEFAULT_WEIGHTS,
        ", ".join(FALLBACK_MODELS),
    )
    return list(FALLBACK_MODELS)
