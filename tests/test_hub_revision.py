"""Hub models by revision (issue 37): a hub id resolves to the cached snapshot of one commit, whose hash is the
model's identity — a fake Hugging Face cache with two snapshots of one id gives two identities, offline."""

from __future__ import annotations

import pytest

from resofilter._io import model_fingerprint
from resofilter.errors import ConfigError, ResoFilterError
from resofilter.models.hub import hub_identity, is_hub_id, resolve_hub_model

A, B = "a" * 40, "b" * 40


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """``acme/tiny`` with snapshots A (``main``) and B, as huggingface_hub lays out its cache; offline."""
    import huggingface_hub.constants as hc

    repo = tmp_path / "hub" / "models--acme--tiny"
    for commit, width in ((A, 8), (B, 16)):
        snap = repo / "snapshots" / commit
        snap.mkdir(parents=True)
        (snap / "config.json").write_text(f'{{"hidden_size": {width}}}')
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(A)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hub"


def test_two_snapshots_of_one_id_are_two_identities(hub_cache, tmp_path):
    main = resolve_hub_model("acme/tiny", None)
    pinned = resolve_hub_model("acme/tiny", B)
    assert main.name == A and pinned.name == B and (pinned / "config.json").read_text() == '{"hidden_size": 16}'
    assert resolve_hub_model("acme/tiny", "main") == main  # a branch reads its ref
    ids = {model_fingerprint(p, tmp_path / "memo") for p in (main, pinned)}
    assert ids == {f"hub:acme/tiny@{A}", f"hub:acme/tiny@{B}"}
    assert hub_identity(tmp_path) is None and model_fingerprint("acme/other", None) == "name:acme/other"


def test_an_uncached_revision_offline_names_the_model_and_the_way_out(hub_cache):
    with pytest.raises(ResoFilterError, match=r"acme/tiny@c{40} is not in the Hugging Face cache.*--revision"):
        resolve_hub_model("acme/tiny", "c" * 40)


def test_a_run_resolves_a_hub_id_to_its_snapshot_by_model_revision(hub_cache, tmp_path):
    from omegaconf import OmegaConf

    from resofilter.stages.context import _model_dir

    for rev, commit in ((None, A), (B, B)):
        m = OmegaConf.create({"name_or_path": "acme/tiny", "revision": rev})
        assert _model_dir(OmegaConf.create({}), m, "model", None).endswith(commit)
    assert is_hub_id("acme/tiny") and not is_hub_id(str(tmp_path)) and not is_hub_id("./local")


def test_a_revision_of_a_model_that_is_not_a_hub_id_is_refused(tmp_path):
    from resofilter.cli import compose_config
    from resofilter.stages.config_check import validate
    from tests.conftest import compose_cfg

    with pytest.raises(ConfigError, match="`model.revision`.*not a hub id"):  # the embedded model
        validate(compose_cfg(["+model.revision=v1"]))
    with pytest.raises(ConfigError, match="`model.revision`.*not a hub id"):  # the packaged default
        validate(compose_config("run", ["+model.revision=v1", f"paths.cache_dir={tmp_path}"]))
    validate(compose_config("run", ["model=gemma2_2b", "model.revision=v1", f"paths.cache_dir={tmp_path}"]))
