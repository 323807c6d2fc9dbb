"""The numeric environment recorded with every build and run, and `table` saying when runs differ in it."""

from __future__ import annotations

import json

import torch

from resofilter.environment import differences, environment
from resofilter.reporting.table import write_table
from tests.helpers.common import _fake_result


def test_environment_names_what_changes_numbers():
    env = environment()
    assert env["packages"]["torch"] == torch.__version__
    assert env["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert env["torch_threads"] == torch.get_num_threads()
    assert {"transformers", "tokenizers", "pytorch-lightning", "numpy"} <= set(env["packages"])
    cpuinfo = open("/proc/cpuinfo").read()
    assert env["cpu"] and env["cpu"] in cpuinfo  # the model name: MKL's code path differs by vendor, not only ISA
    json.dumps(env)  # written into build.json and results.json


def test_differences_by_hand():
    a = {"packages": {"torch": "2.13.0", "numpy": "2.1"}, "torch_cpu_capability": "AVX2", "torch_threads": 2,
         "machine": "x86_64", "cpu": "AMD EPYC"}
    b = {**a, "packages": {"torch": "2.13.0", "numpy": "2.2"}, "torch_cpu_capability": "AVX512"}
    assert differences([a, dict(a), None]) == {}
    assert differences([a, b]) == {"packages.numpy": ["2.1", "2.2"], "torch_cpu_capability": ["AVX2", "AVX512"]}
    assert differences([a, {**a, "cpu": "Intel Xeon"}]) == {"cpu": ["AMD EPYC", "Intel Xeon"]}


def test_table_says_when_the_merged_runs_differ_in_environment(tmp_path, caplog):
    for i, cap in enumerate(("AVX2", "AVX2", "AVX512")):
        _fake_result(tmp_path / "sweep" / str(i), "resofilter", i, {"math_synth": 0.3})
        f = tmp_path / "sweep" / str(i) / "results.json"
        r = json.loads(f.read_text())
        r["environment"] = {**environment(), "torch_cpu_capability": cap}
        f.write_text(json.dumps(r))
    with caplog.at_level("WARNING"):
        md = write_table(tmp_path / "sweep")["markdown"]
    assert "Environments differ between these runs (torch_cpu_capability: AVX2, AVX512)" in md
    assert "different environments" in caplog.text
    (tmp_path / "sweep" / "2").rename(tmp_path / "other")  # the same environment everywhere: nothing said
    assert "Environments differ" not in write_table(tmp_path / "sweep")["markdown"]


def test_a_cached_build_is_keyed_by_what_changes_its_bits(monkeypatch, tmp_path):
    """A build made under another CPU code path is another model (experiments/README.md, "Portable numerics"):
    the base model's cache key changes with a variable that forces a kernel path or with a package version,
    and stays put otherwise. Not with torch's thread count: Lightning's DDP launcher lowers it in the workers,
    which must find the build rank 0 made (the count is recorded in build.json)."""
    from omegaconf import OmegaConf

    from resofilter import environment as env_module
    from resofilter.configs import load_group_option
    from resofilter.data.templates import FormatTemplate
    from resofilter.stages.embedded import base_model_key

    embedded = OmegaConf.to_container(load_group_option("model", "tiny_llama").embedded, resolve=True)
    template = FormatTemplate("plain", "Question: {query}\nAnswer: ")
    key = lambda: base_model_key(embedded, tmp_path, template, build=0)  # noqa: E731
    first = key()
    assert key() == first
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads != 1 else 2)
        assert key() == first
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setenv("MKL_CBWR", "COMPATIBLE")
    assert key() != first
    monkeypatch.delenv("MKL_CBWR")
    assert key() == first
    real = env_module.package_version
    monkeypatch.setattr(env_module, "package_version", lambda name: "9.9" if name == "torch" else real(name))
    assert key() != first
