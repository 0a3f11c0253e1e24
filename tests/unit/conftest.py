"""Models shared by the unit tests, loaded once per module that asks for them."""

from __future__ import annotations

import pytest

from dllm_serve.models.loader import LoadedModel, load_model
from tests.helpers import TINY_LLADA, random_llada_config, random_official_weights, write_llada_checkpoint


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    """The bundled, trained tiny-llada."""
    return load_model(TINY_LLADA)


@pytest.fixture(scope="module")
def random_model(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """A random LLaDA with grouped-query attention and unsaturated probabilities: thresholds are
    rarely reached, so choices that a confident model hides (``steps``, commit order) show."""
    cfg = random_llada_config(n_kv_heads=2)
    path = tmp_path_factory.mktemp("random") / "m"
    return load_model(write_llada_checkpoint(path, cfg, random_official_weights(cfg, scale=0.3)))
