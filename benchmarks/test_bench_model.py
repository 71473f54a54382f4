"""Model-level pytest-benchmark suite (``make bench-ops``): one training step and one inference
forward per provider of ``vapt-bench``, on the CLI's default shapes for the device."""

from __future__ import annotations

import pytest
import torch

from vapt_kernels import bench

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CFG = bench.BenchConfig(
    model="vit_base_patch16_224" if DEVICE == "cuda" else "vit_small_patch16_224",
    batch=128 if DEVICE == "cuda" else 8,
    prompts=10,
    dtype="bf16" if DEVICE == "cuda" else "fp32",
    device=DEVICE,
    steps=1,
    warmup=1,
    providers=bench.PROVIDERS,
)


@pytest.fixture(scope="module")
def setup():
    base = bench.build_backbone(CFG)
    return bench.build_providers(CFG, base), bench.inputs(CFG, base)


@pytest.mark.parametrize("mode", bench.MODES)
@pytest.mark.parametrize("provider", bench.PROVIDERS)
def test_step(benchmark, setup, provider, mode):
    models, (x, y) = setup
    model = models[provider]
    if isinstance(model, Exception):
        pytest.skip(f"{provider}: {model}")
    model.train(mode == "train")
    step = bench.make_step(model, mode, x, y, CFG)
    sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)
    benchmark.pedantic(lambda: (step(), sync()), rounds=5, warmup_rounds=1)
