import math
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flwr_alie.attacks import Direction, alie_vector, check_z, moments
from flwr_alie.attacks import stats as stats_module
from tests.conftest import DTYPES, TOLERANCES


def reference_moments(x: torch.Tensor) -> tuple[list[float], list[float]]:
    """Deliberately naive: loops over coordinates and rows, in float64."""
    rows = x.double().tolist()
    h, d = len(rows), len(rows[0]) if rows else 0
    mu = [sum(r[j] for r in rows) / h for j in range(d)]
    sigma = [math.sqrt(sum((r[j] - mu[j]) ** 2 for r in rows) / h) for j in range(d)]
    return mu, sigma


def test_golden_values():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    mu, sigma = moments(x)
    torch.testing.assert_close(mu, torch.tensor([4.0, 5.0, 6.0]))
    # population standard deviation: divisor h = 3, not h - 1
    torch.testing.assert_close(sigma, torch.full((3,), math.sqrt(6.0)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocks", [False, True])
def test_matches_the_float64_reference_on_shifted_data(dtype, blocks, monkeypatch):
    if blocks:  # many ragged column blocks
        monkeypatch.setattr(stats_module, "_CPU_BLOCK_BYTES", 100)
    g = torch.Generator().manual_seed(0)
    x = (1 + 1e-3 * torch.randn(7, 53, generator=g, dtype=torch.float64)).to(dtype)
    mu, sigma = moments(x)
    assert mu.dtype == sigma.dtype == torch.promote_types(dtype, torch.float32)
    ref_mu, ref_sigma = reference_moments(x)
    tol = {"rtol": 1e-12, "atol": 1e-15} if dtype == torch.float64 else {}
    torch.testing.assert_close(
        mu.double(), torch.tensor(ref_mu, dtype=torch.float64), **tol
    )
    # relative to the spread, not to the mean: E[x^2] - E[x]^2 would fail here
    scale = torch.tensor(ref_sigma, dtype=torch.float64).max()
    err = (
        sigma.double() - torch.tensor(ref_sigma, dtype=torch.float64)
    ).abs().max() / scale
    assert err < (1e-9 if dtype == torch.float64 else 1e-3)


@settings(max_examples=40, deadline=None)
@given(
    h=st.integers(1, 6),
    d=st.integers(0, 9),
    a=st.floats(0.1, 10),
    b=st.floats(-100, 100),
    seed=st.integers(0, 2**31),
)
def test_affine_equivariance_and_input_untouched(h, d, a, b, seed):
    x = torch.randn(h, d, generator=torch.Generator().manual_seed(seed)).double()
    before = x.clone()
    mu, sigma = moments(x)
    mu2, sigma2 = moments(a * x + b)
    torch.testing.assert_close(mu2, a * mu + b)
    torch.testing.assert_close(sigma2, a * sigma, atol=1e-9, rtol=1e-9)
    assert torch.equal(x, before)


def test_one_row_has_zero_spread():
    mu, sigma = moments(torch.tensor([[3.0, -1.0]]))
    assert torch.equal(sigma, torch.zeros(2))
    assert torch.equal(mu, torch.tensor([3.0, -1.0]))


@pytest.mark.parametrize(
    ("x", "error", "match"),
    [
        ([[1.0]], TypeError, "torch.Tensor, got list"),
        (torch.ones(2, 2, dtype=torch.int64), TypeError, "floating-point `x`"),
        (torch.ones(3), ValueError, r"shape \(h, d\) with h >= 1, got \(3,\)"),
        (torch.ones(0, 3), ValueError, r"got \(0, 3\)"),
    ],
)
def test_bad_input(x, error, match):
    with pytest.raises(error, match=match):
        moments(x)


@pytest.mark.parametrize("direction", list(Direction))
def test_alie_vector_golden(direction):
    mu, sigma = torch.tensor([1.0, -2.0, 0.0]), torch.tensor([0.5, 1.0, 2.0])
    sign = {
        Direction.NEGATIVE: torch.tensor([-1.0, -1.0, -1.0]),
        Direction.POSITIVE: torch.tensor([1.0, 1.0, 1.0]),
        Direction.OPPOSITE_MEAN: torch.tensor([-1.0, 1.0, 0.0]),
    }[direction]
    out = torch.empty(3, dtype=torch.float16)
    got = alie_vector(mu, sigma, z=2.0, direction=direction, out=out)
    assert got is out
    torch.testing.assert_close(got, (mu + sign * 2.0 * sigma).half())


@pytest.mark.parametrize(
    ("z", "error", "match"),
    [
        ("min", TypeError, r'real number or "max", got \'min\''),
        (True, TypeError, r"got True \(bool\)"),
        (-1, ValueError, r"Expected `z` >= 0, got -1.0"),
        (float("nan"), ValueError, "finite `z`, got nan"),
    ],
)
def test_z_is_checked_in_one_place(z, error, match):
    with pytest.raises(error, match=match):
        check_z(z)
    with pytest.raises(error, match=match):
        alie_vector(torch.zeros(1), torch.zeros(1), z=z)


def test_alie_vector_needs_a_resolved_z():
    with pytest.raises(TypeError, match=r"z_max\(h, f\)"):
        alie_vector(torch.zeros(1), torch.zeros(1), z="max")  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", DTYPES)
def test_generate_is_moments_then_alie_vector(dtype):
    x = torch.randn(5, 11, generator=torch.Generator().manual_seed(1)).to(dtype)
    from flwr_alie import ALIEAttack

    got = ALIEAttack.generate(x, f=3, z=1.5)
    row = alie_vector(*moments(x), z=1.5).to(dtype)
    torch.testing.assert_close(got, row.expand(3, 11), **TOLERANCES[dtype])


def _imported_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    return set(out.stdout.split())


@pytest.mark.parametrize("package", ["attacks", "aggregators"])
def test_the_core_imports_neither_flower_nor_numpy(package):
    modules = _imported_after(f"import flwr_alie.{package}")
    assert not any(m == "flwr" or m.startswith("flwr.") for m in modules)
    assert "numpy" not in modules or "torch" in modules  # torch itself may load it
    # within flwr-alie: the torch core only (the package imports attacks at once)
    others = {m for m in modules if m.startswith("flwr_alie.") and package not in m}
    assert all(m == "flwr_alie._checks" or ".attacks" in m for m in others), others


def test_the_legacy_api_is_one_deletable_module():
    modules = _imported_after(
        "import flwr_alie.strategy, flwr_alie.mod, flwr_alie.limits, "
        "flwr_alie.engine, flwr_alie.evaluation.cli"
    )
    assert "flwr_alie.legacy" not in modules
