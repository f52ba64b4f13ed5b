"""Request and response models of the HTTP API (docs/API.md), shown in the OpenAPI schema.

Binary forms (multipart uploads, raw images, .npy, safetensors) are documented on the routes; the JSON forms
are these models. Tensors on the wire are :class:`TensorJSON` (flat row-major ``data``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, RootModel, field_validator

from server.queue.base import PRIORITY_RANGE

MAX_DEADLINE_MS = 24 * 3600 * 1000  # x-deadline-ms / deadline_ms: at most a day
ImageFormat = Literal["png", "jpeg", "webp"]
DecodeFormat = Literal["png", "jpeg", "webp", "npy"]
PreprocessMode = Literal["center-crop", "resize"]


class TensorJSON(BaseModel):
    """A tensor as JSON: ``data`` holds prod(shape) numbers in row-major order."""

    shape: list[int] = Field(..., examples=[[1, 64, 32]])
    dtype: str = Field("float32", description="float32 (also float16, bfloat16, float64) or int64 codes")
    data: list[float] | list[int] = Field(..., description="flat row-major values")


class EncodeJSONRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image: str | None = Field(None, description="one base64 image (PNG, JPEG or WebP)")
    images: list[str] | None = Field(None, description="several base64 images (B = len)")
    model: str | None = Field(None, description="tokenizer name; default: the default tokenizer")
    preprocess: PreprocessMode | None = Field(None, description="center-crop (ADM, default) or resize")


class EncodeForm(BaseModel):
    """The ``multipart/form-data`` form of ``POST /v1/encode``. The route reads it by hand (it shares the route
    with raw-image and JSON bodies); this model is its OpenAPI schema and its list of fields."""

    model_config = ConfigDict(extra="forbid")

    image: list[bytes] = Field(..., min_length=1, description="one or more image files (B = number of files)")
    model: str | None = Field(None, description="tokenizer name; default: the default tokenizer")
    preprocess: PreprocessMode | None = Field(None, description="center-crop (ADM, default) or resize")


class EncodeResponse(TensorJSON):
    model: str = Field(..., description="the tokenizer that encoded")


class DecodeJSONRequest(TensorJSON):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="tokenizer name; default: the default tokenizer")
    format: DecodeFormat | None = Field(None, description="output: png (default), jpeg, webp or npy")


class DecodeImagesResponse(BaseModel):
    """B > 1 images: base64 files."""

    model: str
    format: ImageFormat
    images: list[str]


class GenerateQuery(BaseModel):
    """Generation parameters as query parameters (``POST /v1/generate?class=207&steps=50``): every field of
    :class:`GenerateParams` but ``guidance_interval`` (given here as ``guidance_low`` / ``guidance_high``).
    Unset values come from the generator's config (``GET /v1/models`` ``defaults``)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)

    class_id: int | None = Field(None, validation_alias=AliasChoices("class", "class_id"),
                                 description="ImageNet-1k class id served by the model (alias class_id)")
    num_images: int = Field(1, ge=1, description="images to generate; image i uses seed + i")
    cfg_scale: float | None = Field(None, ge=0.0, le=100.0, description="classifier-free guidance scale")
    guidance_low: float | None = Field(None, ge=0.0, le=1.0, description="query form of guidance_interval[0]")
    guidance_high: float | None = Field(None, ge=0.0, le=1.0, description="query form of guidance_interval[1]")
    steps: int | None = Field(None, ge=1, description="denoising steps (MAR / MaskGIT: iterations; VAR: its "
                                                      "number of scales, the only value it takes)")
    sampler: str | None = Field(None, description="SiT: euler, heun, sde; DiT: ddpm, ddim; MAR: mar; "
                                                  "MaskGIT: maskgit; VAR: var")
    seed: int | None = Field(None, ge=0, le=2**53, description="random when absent; always returned")
    format: ImageFormat | None = Field(None, description="png (default), jpeg or webp")
    return_latents: bool = Field(False, description="also return the tokens (B, L, D), un-normalised (integer "
                                                    "codes for a discrete generator)")
    model: str | None = Field(None, description="generator name; default: the default generator")

    @field_validator("class_id", "num_images", "cfg_scale", "guidance_low", "guidance_high", "steps", "seed",
                     mode="before")
    @classmethod
    def _no_booleans(cls, v: object) -> object:
        if isinstance(v, bool):  # JSON true / false are not numbers (pydantic would take them as 1 / 0)
            raise ValueError("must be a number, not true / false")
        return v


class GenerateParams(GenerateQuery):
    """Generation parameters, as query parameters (:class:`GenerateQuery`) or JSON fields (JSON wins). Unset
    values come from the generator's config (``GET /v1/models`` ``defaults``)."""

    guidance_interval: tuple[float, float] | None = Field(
        None, description="[low, high]: guidance is applied while low <= t <= high")


class GeneratedImage(BaseModel):
    seed: int
    format: ImageFormat
    data: str = Field(..., description="base64 image file")


class GenerateResponse(BaseModel):
    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True)

    model: str
    class_id: int = Field(..., serialization_alias="class", validation_alias=AliasChoices("class", "class_id"))
    seed: int
    cfg_scale: float
    guidance_interval: tuple[float, float]
    steps: int
    sampler: str
    images: list[GeneratedImage]
    latents: TensorJSON | None = Field(None, description="only with return_latents: tokens (B, L, D)")


class ModelInfo(BaseModel):
    name: str
    kind: Literal["tokenizer", "generator"]
    family: str
    image_size: int
    token_shape: list[int] = Field(..., description="one image's tokens: (L, D) latents, or the shape of its "
                                   "integer codes for a discrete tokenizer and its generators")
    token_dtype: str = Field(..., description="float32 (continuous latents) or int64 (discrete codes)")
    code_structure: dict[str, Any] | None = Field(
        None, description="discrete tokenizers: branches, scales, codebook_size, code_dim, shape, layout")
    tokenizer: str | None = Field(None, description="generators: the tokenizer that decodes them")
    classes: list[int] | None = Field(None, description="generators: the class ids served")
    num_classes: int | None = Field(None, description="generators: the null (unconditional) class id")
    samplers: list[str] | None = None
    defaults: dict[str, object]
    runtime: str
    random_weights: bool = Field(..., description="true: a registry configuration with random weights")
    warnings: list[str] = Field(default_factory=list, description="problems found when the model's config was "
                                "read, e.g. a published tokenizer config without vq_mean / vq_std")


class ModelsResponse(BaseModel):
    models: list[ModelInfo]
    default_tokenizer: str | None
    default_generator: str | None


class ClassName(BaseModel):
    id: int = Field(..., description="ImageNet-1k class id (0..999)")
    name: str


class ClassesResponse(BaseModel):
    classes: list[ClassName] = Field(..., description="the 1,000 ImageNet-1k classes in id order")
    source: str = Field(..., description="where the names come from")


class JobControl(BaseModel):
    """What a ``POST /v1/jobs`` body adds to the JSON body of its synchronous route (``op`` says which)."""

    op: Literal["encode", "decode", "generate"]
    priority: int = Field(0, ge=PRIORITY_RANGE[0], le=PRIORITY_RANGE[1],
                          description="higher runs sooner (also the x-priority header)")
    deadline_ms: float | None = Field(None, gt=0, le=MAX_DEADLINE_MS,
                                      description="fail the job if not done by then, in ms (also x-deadline-ms)")


class EncodeJob(JobControl, EncodeJSONRequest):
    op: Literal["encode"]


class DecodeJob(JobControl, DecodeJSONRequest):
    op: Literal["decode"]


class GenerateJob(JobControl, GenerateParams):
    op: Literal["generate"]


class JobRequest(RootModel[Annotated[EncodeJob | DecodeJob | GenerateJob, Field(discriminator="op")]]):
    """The body of POST /v1/jobs: the JSON body of POST /v1/<op> plus op, priority and deadline_ms. (The route
    reads it by hand, as its synchronous route does; this model is its OpenAPI schema.)"""


JobStatus = Literal["queued", "running", "completed", "failed", "cancelled"]


class JobLinks(BaseModel):
    self: str
    events: str
    cancel: str


class JobAccepted(BaseModel):
    """``202`` of ``POST /v1/jobs`` (``Location`` is ``links.self``)."""

    id: str
    op: Literal["encode", "decode", "generate"]
    model: str
    status: JobStatus
    priority: int
    links: JobLinks


class JobProgress(BaseModel):
    step: int
    steps: int


class JobError(BaseModel):
    type: str
    message: str


class JobResponse(BaseModel):
    """``GET /v1/jobs/{id}`` and ``POST /v1/jobs/{id}/cancel`` (without ``result``)."""

    id: str
    op: Literal["encode", "decode", "generate"]
    model: str
    status: JobStatus
    priority: int
    request_id: str
    submitted_at: float
    started_at: float | None
    finished_at: float | None
    deadline: float | None = Field(..., description="unix seconds")
    deliveries: int
    progress: JobProgress | None
    error: JobError | None
    result: dict[str, Any] | None = Field(..., description="once completed: the synchronous route's JSON body")


class ErrorDetail(BaseModel):
    type: str
    message: str
    request_id: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


class HealthResponse(BaseModel):
    status: str
    detail: str | None = None


ERROR_RESPONSES: dict[int | str, dict[str, object]] = {
    code: {"model": ErrorResponse, "description": why}
    for code, why in {
        400: "bad input (undecodable image, malformed or too deeply nested body, lying tensor header)",
        401: "API key missing or wrong",
        404: "unknown model, job or route",
        405: "method not allowed on this route (Allow lists the methods)",
        413: "body, image or the request's pixels too large",
        415: "unsupported content type",
        422: "invalid values (token shape/dtype, NaN, class out of range, bad parameter)",
        429: "queue full or too much being decoded (Retry-After)",
        500: "the model failed on this request",
        503: "not ready, shutting down or queue backend unreachable (Retry-After)",
        504: "deadline passed",
    }.items()
}


# ---------------------------------------------------------------------------------------------- Open Inference
# Protocol (KServe v2) under /v2: documentation of its JSON forms (the routes read and write them by hand).

V2Parameter = str | int | float | bool


class V2Error(BaseModel):
    """Every error under ``/v2`` (the protocol's form); the status comes from the same table as ``/v1``."""

    error: str


class V2ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class V2Live(BaseModel):
    live: bool


class V2Ready(BaseModel):
    ready: bool


class V2ModelReady(BaseModel):
    name: str
    ready: bool


class V2TensorMetadata(BaseModel):
    name: str
    datatype: str = Field(..., examples=["UINT8"])
    shape: list[int] = Field(..., description="-1: a variable dimension", examples=[[-1, -1, -1, 3]])


class V2ModelMetadata(BaseModel):
    name: str
    platform: str
    inputs: list[V2TensorMetadata]
    outputs: list[V2TensorMetadata]


class V2InferInput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, V2Parameter] | None = Field(None, description="binary_data_size: the tensor's bytes "
                                                      "in the binary part of the body")
    data: list[Any] | None = Field(None, description="row-major, flat or nested (absent with binary_data_size)")


class V2RequestedOutput(BaseModel):
    name: str
    parameters: dict[str, V2Parameter] | None = Field(None, description="binary_data: true puts the output in "
                                                      "the binary part of the answer")


class V2InferRequest(BaseModel):
    id: str | None = None
    parameters: dict[str, V2Parameter] | None = Field(None, description="the operation's parameters (seed, "
                                                      "cfg_scale, steps, ...) and binary_data_output")
    inputs: list[V2InferInput] = Field(..., min_length=1)
    outputs: list[V2RequestedOutput] | None = None


class V2InferOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, V2Parameter] | None = None
    data: list[Any] | None = None


class V2InferResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    model_name: str
    id: str | None = None
    parameters: dict[str, V2Parameter] | None = None
    outputs: list[V2InferOutput]


V2_ERROR_RESPONSES: dict[int | str, dict[str, object]] = {
    code: {"model": V2Error, "description": str(spec["description"])} for code, spec in ERROR_RESPONSES.items()
}
