"""Models by Hugging Face id: resolved offline from the local Hub cache (its models--org--name/snapshots/<rev>
layout), with a one-line error naming the id, the cache and how to get it when it is not there."""

import shutil

import pytest

from pollinate.common.models import ModelError, load_model, load_tokenizer, resolve_model

REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A Hub cache holding tiny-llama as ``test-org/tiny-llama`` (what ``hf download`` leaves behind)."""
    repo = tmp_path / "hub" / "models--test-org--tiny-llama"
    shutil.copytree(resolve_model("tiny-llama").path, repo / "snapshots" / REVISION)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hub"


def test_a_cached_hub_id_resolves_to_its_snapshot_and_loads(hub_cache):
    info = resolve_model("test-org/tiny-llama")
    assert info.path == str(hub_cache / "models--test-org--tiny-llama" / "snapshots" / REVISION)
    assert (info.family, info.default_task) == ("llama", "generation")
    model, tokenizer = load_model(info.path, "generation"), load_tokenizer(info.path)
    assert model.config.model_type == "llama" and tokenizer("ab")["input_ids"]


def test_an_id_not_in_the_cache_says_where_it_looked_and_how_to_get_it(hub_cache):
    with pytest.raises(ModelError) as error:
        resolve_model("test-org/missing-model")
    message = str(error.value)
    assert "\n" not in message and "'test-org/missing-model' is not in the local Hugging Face cache" in message
    assert str(hub_cache) in message and "hf download test-org/missing-model" in message


def test_a_snapshot_without_its_config_is_refused(hub_cache):
    (hub_cache / "models--test-org--tiny-llama" / "snapshots" / REVISION / "config.json").unlink()
    with pytest.raises(ModelError, match="without its config.json"):
        resolve_model("test-org/tiny-llama")


def test_a_name_that_is_neither_preset_directory_nor_id_suggests_the_preset(hub_cache):
    with pytest.raises(ModelError, match="did you mean 'tiny-llama'"):
        resolve_model("tiny-lama")
