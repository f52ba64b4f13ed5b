"""GET /v1/models: what is loaded, with shapes, classes and sampling defaults."""

from __future__ import annotations

from fastapi import APIRouter

from server.deps import StateDep
from server.engine.specs import ModelSpec
from server.schemas import ModelInfo, ModelsResponse

router = APIRouter()


def model_info(spec: ModelSpec, runtime: str) -> ModelInfo:
    gen = spec.kind == "generator"
    return ModelInfo(
        name=spec.name, kind=spec.kind, family=spec.family, image_size=spec.image_size,
        token_shape=list(spec.token_shape), token_dtype=spec.token_dtype, code_structure=spec.code_structure,
        tokenizer=spec.tokenizer if gen else None, classes=list(spec.classes) if gen else None,
        num_classes=spec.num_classes if gen else None, samplers=list(spec.samplers) if gen else None,
        defaults=spec.defaults, runtime=runtime, random_weights=spec.random_weights,
        warnings=list(getattr(spec.config, "load_warnings", ())),
    )


@router.get("/v1/models", response_model=ModelsResponse, summary="Loaded models")
async def list_models(state: StateDep) -> ModelsResponse:
    engine = state.engine
    runtimes = engine.runtimes if engine is not None else {}
    infos = [model_info(s, getattr(runtimes.get(s.name), "name", "torch-eager"))
             for s in state.models.specs.values()]
    return ModelsResponse(models=infos, default_tokenizer=state.models.default_tokenizer,
                          default_generator=state.models.default_generator)
