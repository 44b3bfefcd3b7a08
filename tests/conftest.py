"""Shared fixtures: tiny random Llamas built in the test session (512-, 2,048- and 4,096-token windows),
and the real default model. Define a fixture here when more than one test file needs it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from flashback_agents.evaluation.common import shared_data_dir  # noqa: E402 - after the offline settings

SHARED_DATA = shared_data_dir()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from flashback_agents.testing import build_tiny_model_dir

    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_lm(tiny_model_dir):
    from flashback_agents import load_model

    return load_model(str(tiny_model_dir), device="cpu")


@pytest.fixture(scope="module")
def tiny_dir_2k(tmp_path_factory) -> Path:
    """A tiny random Llama with a 2,048-token window (the tool block alone is ~500 of its tokens; contexts
    of several 256-token blocks). One per test module: engines are shared per model path."""
    from flashback_agents.testing import build_tiny_model_dir

    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny-2k"), max_positions=2048)


@pytest.fixture(scope="module")
def tiny_lm_2k(tiny_dir_2k):
    """The 2,048-token tiny model, loaded (one per test module)."""
    from flashback_agents import load_model

    return load_model(str(tiny_dir_2k), device="cpu")


@pytest.fixture(scope="module")
def long_dir(tmp_path_factory) -> Path:
    """A tiny random Llama with a 4,096-token window (long conversations, its tool block is ~400 tokens).
    One per test module: engines are shared per model path."""
    from flashback_agents.testing import build_tiny_model_dir

    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny-long"), max_positions=4096)


@pytest.fixture(scope="session")
def default_lm():
    from flashback_agents import shared_model

    return shared_model()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA
