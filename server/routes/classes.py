"""GET /v1/classes: the ImageNet-1k class names (id -> name), for the ids that ``GET /v1/models`` lists per
generator. The names ship inside the installed torchvision package (its ImageNet-1k weights' metadata, the
WordNet lemmas with the two duplicate names disambiguated): nothing is read from outside the packages."""

from __future__ import annotations

from functools import lru_cache

from fastapi import APIRouter

from server.schemas import ClassesResponse, ClassName

router = APIRouter()
SOURCE = "torchvision ImageNet-1k categories (ResNet50_Weights.IMAGENET1K_V1.meta)"


@lru_cache(maxsize=1)
def imagenet_class_names() -> tuple[str, ...]:
    """The 1,000 ImageNet-1k class names in id order (no weights are loaded: metadata only)."""
    from torchvision.models import ResNet50_Weights

    names = tuple(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])
    if len(names) != 1000:
        raise RuntimeError(f"torchvision lists {len(names)} ImageNet classes, expected 1000")
    return names


@router.get("/v1/classes", response_model=ClassesResponse, summary="ImageNet-1k class names")
async def list_classes() -> ClassesResponse:
    return ClassesResponse(classes=[ClassName(id=i, name=n) for i, n in enumerate(imagenet_class_names())],
                           source=SOURCE)
