import pytest
import torch
import torch.nn.functional as F

from ngsd_kernels.ops.skinny_linear import SKINNY_MAX_ROWS, skinny_applies, skinny_linear


@pytest.mark.parametrize("shape", [(2, 16), (3, 1, 16), (4, 2, 16), (SKINNY_MAX_ROWS, 16)])
@pytest.mark.parametrize("bias", [False, True])
def test_equals_f_linear(shape, bias):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen)
    weight = torch.randn(24, 16, generator=gen)
    b = torch.randn(24, generator=gen) if bias else None
    got = skinny_linear(x, weight, b)
    assert got.shape == F.linear(x, weight, b).shape and got.is_contiguous()
    torch.testing.assert_close(got, F.linear(x, weight, b), rtol=1e-5, atol=1e-5)


def test_applies_only_to_few_fp32_rows_without_grad():
    weight = torch.randn(8, 4)
    with torch.no_grad():
        assert skinny_applies(torch.randn(2, 1, 4), weight)
        assert not skinny_applies(torch.randn(1, 1, 4), weight)  # one row: F.linear is as fast
        assert not skinny_applies(torch.randn(SKINNY_MAX_ROWS + 1, 4), weight)
        assert not skinny_applies(torch.randn(2, 4, dtype=torch.float64), weight.double())
    assert not skinny_applies(torch.randn(2, 4), weight)  # autograd on: leave training alone
