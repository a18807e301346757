from __future__ import annotations

from pathlib import Path

import pytest

from search.data import PackedData, pack
from tests.hw4fake import make_hw4


@pytest.fixture(autouse=True)
def _isolated_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test runs in its own folder so default paths (studies/...) never touch the repo."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SPKID_SEARCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SPKID_SEARCH_DATA", str(tmp_path / "data"))


@pytest.fixture(scope="session")
def fake_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_hw4(tmp_path_factory.mktemp("fake") / "Dataset")


@pytest.fixture(scope="session")
def fake_data(fake_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> PackedData:
    return pack(fake_dir, tmp_path_factory.mktemp("fake-cache"), progress=False)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from search.synth import generate

    return generate(tmp_path_factory.mktemp("tiny") / "Dataset", preset="tiny", seed=0, progress=False)


@pytest.fixture(scope="session")
def tiny_data(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> PackedData:
    return pack(tiny_dir, tmp_path_factory.mktemp("tiny-cache"), progress=False)
