"""Model-level pytest-benchmark suite (``make bench-ops``): one training step and one inference
forward per provider of ``vapt-bench``, built, fed and stepped by its harness on the CLI's default
configuration for the device; pytest-benchmark times them one provider after the other."""

from __future__ import annotations

import pytest
import torch

from vapt_kernels.bench import harness

CFG = harness.BenchConfig.for_device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="module")
def setup():
    base = harness.build_backbone(CFG)
    return harness.build_providers(CFG, base), harness.inputs(CFG, base)


@pytest.mark.parametrize("mode", harness.MODES)
@pytest.mark.parametrize("provider", harness.PROVIDERS)
def test_step(benchmark, setup, provider, mode):
    models, (x, y) = setup
    model = models[provider]
    if isinstance(model, harness.Unavailable):
        pytest.skip(f"{provider}: {model}")
    step = harness.make_step(model, mode, x, y, CFG.dtype)
    sync = torch.cuda.synchronize if CFG.device == "cuda" else (lambda: None)
    benchmark.pedantic(lambda: (step(), sync()), rounds=5, warmup_rounds=1)
