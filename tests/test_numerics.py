"""The shared numerics (vqkernels/numerics.py, csrc/numerics.h, the Triton kernels' constexprs) agree with each
other and do what their docstrings say."""

import math

import pytest
import torch
from helpers import backend_devices

from vqkernels import numerics


@pytest.mark.skipif(("cpu", "cpu") not in backend_devices(), reason="C++ extension not built")
def test_cpp_header_constants_equal_python():
    from vqkernels import _ext

    assert _ext.C.cos_eps == numerics.COS_EPS
    assert _ext.C.exact_safety == numerics.EXACT_SAFETY
    assert _ext.C.exact_candidates == numerics.EXACT_CANDIDATES


def test_triton_constexprs_are_the_python_values():
    pytest.importorskip("triton")
    from vqkernels.triton import kernels

    assert kernels.COS_EPS.value == numerics.COS_EPS
    rounds = ((kernels.MIX_S0, kernels.MIX_M0), (kernels.MIX_S1, kernels.MIX_M1), (kernels.MIX_S2, kernels.MIX_M2))
    assert tuple((s.value, m.value) for s, m in rounds) == numerics.MIX_ROUNDS
    assert kernels.MIX_LAST.value == numerics.MIX_LAST_SHIFT


def test_gumbel_noise_is_gumbel_and_counter_based():
    rows, codes = torch.arange(4000), torch.arange(250)
    g = numerics.gumbel_noise((12, 34), rows, codes, torch.float64)
    assert g.shape == (250, 4000)
    # Gumbel(0, 1): mean = Euler-Mascheroni, variance = pi^2 / 6 (1M samples: standard errors ~1e-3)
    assert abs(float(g.mean()) - 0.5772156649) < 5e-3
    assert abs(float(g.var()) - math.pi**2 / 6) < 1e-2
    # a value depends on (seed, code, row) only: any block of the grid regenerates it
    block = numerics.gumbel_noise((12, 34), rows[1000:1010], codes[200:203], torch.float64)
    assert torch.equal(block, g[200:203, 1000:1010])
    assert not torch.equal(numerics.gumbel_noise((12, 35), rows, codes, torch.float64), g)
    # the largest value any draw can take (u = (2^23 - 1/2) 2^-23) bounds them all
    top = -math.log(-math.log((2**23 - 0.5) * 2.0**-23))
    assert float(g.max()) <= top


def test_seeds_round_trip_through_the_schema():
    for seed in (0, 1, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1):
        v = numerics.seed_to_schema(seed)
        assert -(2**63) <= v < 2**63
        assert numerics.seed_from_schema(v) == numerics.split_seed(seed)
        assert numerics.join_seed(*numerics.split_seed(seed)) == seed
    for bad in (-1, 2**64, 1.5, True):
        with pytest.raises(ValueError, match="seed must be"):
            numerics.check_seed(bad)


def test_key_terms_tie_equidistant_integer_codes():
    """Two different codes at the same distance from an integer row get bit-equal keys (so the lower index wins),
    because |c|^2 is a sum of squares rounded once, not a rounded norm squared."""
    x = torch.tensor([[1.0, 2.0, 3.0]])
    cb = torch.tensor([[1.0, 2.0, 5.0], [1.0, 2.0, 1.0], [3.0, 2.0, 3.0]])  # all at squared distance 4
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        keys = numerics.keys(x.to(dtype), cb.to(dtype), "l2")
        assert keys[0, 0] == keys[0, 1] == keys[0, 2]


def test_exact_gamma_and_bound():
    assert numerics.exact_gamma(60, torch.bfloat16) == numerics.EXACT_SAFETY * 64 * 2.0**-24
    assert numerics.exact_gamma(60, torch.float64) == numerics.EXACT_SAFETY * 64 * 2.0**-53
    xn, key0 = torch.tensor([2.0]), torch.tensor([-3.0])
    g = 1e-6
    l2 = numerics.key_error_bound("l2", xn, 5.0, key0, g)
    assert torch.allclose(l2, torch.tensor([g * (2 * 2 * 5 + 25) + g * 3]))
    assert torch.allclose(numerics.key_error_bound("cosine", xn, 5.0, key0, g), torch.tensor([g * 2 + g * 3]))
    assert torch.allclose(numerics.key_error_bound("dot", xn, 5.0, key0, g), torch.tensor([g * 10 + g * 3]))
