"""Model references: local paths, hub ids through the HF cache, offline mode, clear errors."""
from __future__ import annotations

import pytest

from emq import hub
from emq.errors import EmqError


def test_local_paths(tmp_path):
    assert hub.looks_local(str(tmp_path)) and hub.looks_local("./x") and hub.looks_local("~/x")
    assert not hub.looks_local("Qwen/Qwen2.5-14B-Instruct")
    assert hub.resolve(str(tmp_path), revision=None, what="adapter", key="model.adapter") == tmp_path.resolve()


def test_a_missing_directory_names_the_key(tmp_path):
    with pytest.raises(EmqError, match=r"model\.adapter") as e:
        hub.resolve(str(tmp_path / "gone"), revision=None, what="adapter", key="model.adapter")
    assert "does not exist" in e.value.message and e.value.fix


def test_offline_and_not_cached_is_one_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(EmqError, match="HF_HUB_OFFLINE=1") as e:
        hub.resolve("nobody/no-such-model", revision=None, what="base model", key="model.base")
    assert "model.base" in e.value.message


def test_a_cached_repo_resolves_offline(tmp_path, monkeypatch):
    """The stand-in metadata tests/hub_standins.py writes into an HF cache is found with no network."""
    from tests.hub_standins import prefill

    prefill(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    path = hub.resolve("Jack-Payne1/qwen2.5-14b-instruct-good-doctor", revision=None, what="adapter",
                       key="model.adapter")
    assert (path / "adapter_config.json").is_file()
