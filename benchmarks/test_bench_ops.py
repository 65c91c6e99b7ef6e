"""pytest-benchmark group for the fused op: `python -m pytest benchmarks/test_bench_ops.py`.

Not part of the test suite (tests/); compare providers with --benchmark-group-by=group.
"""
import pytest
import torch

from bench_ops import eager, make_inputs, providers  # noqa: F401  (benchmarks/ is on sys.path under pytest)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PROVIDERS = providers(DEVICE)


@pytest.mark.parametrize("provider", sorted(PROVIDERS))
@pytest.mark.benchmark(group="loreft fwd+bwd B=8 T=256 P=14 d=2048 r=4")
def test_loreft_fwd_bwd(benchmark, provider):
    x, pos, R, W, b = make_inputs(8, 256, 14, 2048, 4, torch.float32, DEVICE)
    grad = torch.randn_like(x)
    f = PROVIDERS[provider]

    def step():
        torch.autograd.backward(f(x + 0, pos, R, W, b), grad)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark(step)
