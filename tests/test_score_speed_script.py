"""experiments/benchmarks/score_speed.py before a GPU runs it: the real shapes, the CUDA memory branch,
the projection arithmetic, and a child run on CPU through the same code path."""

from __future__ import annotations

import argparse

import pytest
import torch

from tests.conftest import load_experiment_script


@pytest.fixture(scope="module")
def bench():
    return load_experiment_script("benchmarks/score_speed.py")


def test_gemma2_2b_shape_is_the_real_one_counted_on_the_meta_device(bench):
    config = bench.model_config(argparse.Namespace(shape="gemma2-2b", layers=None), vocab=0)
    assert (config.model_type, config.num_hidden_layers, config.hidden_size, config.intermediate_size,
            config.vocab_size, config.tie_word_embeddings) == ("gemma2", 26, 2304, 9216, 256000, True)
    d, hd = 2304, 256
    q, kv = 8 * hd, 4 * hd  # 8 query heads, 4 key/value heads of 256
    per_layer = d * q * 2 + d * kv * 2 + 3 * d * 9216 + 4 * d  # q,o; k,v; gate,up,down; four norms
    params = 256000 * d + 26 * per_layer + d  # tied embedding + layers + final norm: gemma-2-2b's 2.61 B
    assert bench.fp32_bytes(config) == 4 * params
    assert 10.4e9 < 4 * params < 10.5e9  # the README's 10.5 GB in fp32
    short = bench.model_config(argparse.Namespace(shape="llama2-7b", layers=8), vocab=0)
    assert (short.num_hidden_layers, short.intermediate_size, short.vocab_size) == (8, 11008, 32000)


def test_the_cuda_branch_reads_the_device_allocator(bench, monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda dev=None: calls.append(("sync", dev)))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda dev=None: calls.append(("reset", dev)))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda dev=None: 3 * 2**30)
    gpu = bench.Device("cuda:1")
    gpu.reset()
    gpu.sync()
    assert gpu.peak_mb() == 3 * 1024
    assert calls == [("sync", "cuda:1"), ("reset", "cuda:1"), ("sync", "cuda:1")]
    cpu = bench.Device("cpu")
    cpu.reset()
    cpu.sync()
    assert calls[-1] == ("sync", "cuda:1") and cpu.peak_mb() > 50  # RSS, and no CUDA call on CPU


def test_a_split_model_reports_its_fullest_gpu(bench, monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda dev=None: calls.append(("sync", dev)))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda dev=None: calls.append(("reset", dev)))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda dev=None: {"cuda:0": 5, "cuda:1": 7}[dev] * 2**30)
    gpus = bench.Device("cuda", split=True)
    gpus.reset()
    assert gpus.peak_mb() == 7 * 1024
    assert calls == [("sync", "cuda:0"), ("reset", "cuda:0"), ("sync", "cuda:1"), ("reset", "cuda:1")]


def test_projection_by_hand(bench):
    # 1000 tokens/s; 395k samples × 200 tokens = 79 M tokens = 79,000 s = 21.94 h
    assert bench.projection({"tokens": 10_000, "seconds": 10.0}, 200.0) == pytest.approx(79_000 / 3600)


def test_a_child_run_on_cpu_scores_every_sample(bench):
    args = bench.parser().parse_args(["--child", "--mode", "fast", "--n", "12", "--layers", "4", "--vocab", "300",
                                      "--batch-size", "4", "--threads", "1", "--mmap-threshold", "0"])
    out = bench.run_mode(args)
    assert out["n"] == 12 and len(out["scores"]) == 12 and all(v > 0 for v in out["scores"].values())
    plain = bench.run_mode(argparse.Namespace(**{**vars(args), "recompute": False}))
    assert plain["scores"] == out["scores"]  # recomputation changes no score
    # the cost table's options: every layer scored, the stage's eight statistics (the score is the same mean_abs)
    every = bench.run_mode(argparse.Namespace(**{**vars(args), "score_layers": "all", "statistics": "all"}))
    last3 = bench.run_mode(argparse.Namespace(**{**vars(args), "statistics": "all"}))
    assert last3["scores"] == out["scores"] and every["scores"].keys() == out["scores"].keys()
    assert every["scores"] != out["scores"]  # a mean over 4 layers' up_proj, not the last 3
    split = bench.run_mode(argparse.Namespace(**{**vars(args), "device_map": True}))  # the hooks of --device-map
    assert split["scores"] == out["scores"]
    assert set(bench.plan(bench.parser().parse_args(["--n", "8", "--exact-n", "4"]))) >= {
        "forward", "fast", "fast_before", "forward_before"}
