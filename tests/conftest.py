"""Shared fixtures: the tokenizer, ../shared/data (skipped with a reason when absent)."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def tokenizer():
    from data.tokenizer import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="session")
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent (real public data for tests lives beside the repo)")
    return SHARED_DATA
