import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flwr_alie.aggregators import (
    _blocks,
    bucketing,
    centered_clipping,
    geometric_median,
    nearest_neighbor_mixing,
    pairwise_sq_distances,
)
from tests.conftest import DTYPES

# ---------------------------------------------------------------- naive references


def norm(v):
    return math.sqrt(sum(a * a for a in v))


def rows64(x):
    return [[float(a) for a in row] for row in x.double().tolist()]


def ref_cc(x, center, tau, iterations):
    xs, v = rows64(x), [float(a) for a in center.double().tolist()]
    n, d = len(xs), len(v)
    for _ in range(iterations):
        step = [0.0] * d
        for row in xs:
            diff = [a - b for a, b in zip(row, v, strict=True)]
            r = norm(diff)
            s = 1.0 if r == 0 else min(1.0, tau / r)
            step = [a + s * b for a, b in zip(step, diff, strict=True)]
        v = [a + b / n for a, b in zip(v, step, strict=True)]
    return v


def ref_gm(x, weights, nu, iterations, tol):
    xs = rows64(x)
    n, d = len(xs), len(xs[0])
    w = [1.0] * n if weights is None else [float(a) for a in weights.tolist()]
    w = [a / sum(w) for a in w]
    z = [sum(w[i] * xs[i][j] for i in range(n)) for j in range(d)]
    for _ in range(iterations):
        beta = [w[i] / max(nu, norm([a - b for a, b in zip(xs[i], z, strict=True)]))
                for i in range(n)]  # fmt: skip
        new = [sum(beta[i] * xs[i][j] for i in range(n)) / sum(beta) for j in range(d)]
        moved = norm([a - b for a, b in zip(new, z, strict=True)])
        done = moved <= tol * max(1.0, norm(z))
        z = new
        if done:
            break
    return z


def ref_nnm(x, f):
    xs = rows64(x)
    n = len(xs)
    out = []
    for i in range(n):
        ranked = sorted(
            range(n),
            key=lambda j: (norm([a - b for a, b in zip(xs[j], xs[i], strict=True)]), j),
        )
        keep = ranked[: n - f]
        out.append([sum(xs[j][k] for j in keep) / len(keep) for k in range(len(xs[i]))])
    return out


def ref_bucketing(x, s, seed):
    perm = torch.randperm(
        x.shape[0], generator=torch.Generator().manual_seed(seed)
    ).tolist()
    xs = rows64(x)
    out = []
    for k in range(0, len(perm), s):
        rows = perm[k : k + s]
        out.append([sum(xs[i][j] for i in rows) / len(rows) for j in range(len(xs[0]))])
    return out


def shifted(n, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (1 + 1e-3 * torch.randn(n, d, generator=g, dtype=torch.float64)).to(dtype)


# Rounding of the result's own dtype, relative to the spread of the data (1e-3).
TOL = {
    torch.float16: 1e-3 * 1.0,
    torch.bfloat16: 8e-3 * 1.0,
    torch.float32: 2e-6,
    torch.float64: 1e-12,
}


def close(got, ref, dtype):
    ref = torch.tensor(ref, dtype=torch.float64)
    assert got.dtype == dtype
    err = (got.double() - ref).abs().max().item() if ref.numel() else 0.0
    assert err <= TOL[dtype], err


@pytest.fixture(params=[False, True], ids=["one-block", "many-blocks"])
def blocks(request, monkeypatch):
    if request.param:
        monkeypatch.setattr(_blocks, "_CPU_BLOCK_BYTES", 200)


# ------------------------------------------------------------ against references


@pytest.mark.parametrize("dtype", DTYPES)
def test_centered_clipping_matches_the_reference(dtype, blocks):
    x = shifted(7, 23, dtype)
    x[3] += 0.5  # an outlier that gets clipped
    center = x[0].clone()
    got = centered_clipping(x, center=center, tau=2e-3, iterations=3)
    close(got, ref_cc(x, center, 2e-3, 3), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_geometric_median_matches_the_reference(dtype, blocks):
    x = shifted(6, 19, dtype)
    x[5] += 1.0
    weights = torch.tensor([1, 2, 3, 1, 1, 5])
    got = geometric_median(x, weights=weights, nu=1e-8, iterations=20, tol=0)
    close(got, ref_gm(x, weights, 1e-8, 20, 0), dtype)
    got = geometric_median(x, iterations=50, tol=1e-3)
    close(got, ref_gm(x, None, 1e-6, 50, 1e-3), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_nnm_matches_the_reference(dtype, blocks):
    x = shifted(8, 29, dtype)
    x[2] += 0.3
    for f in (0, 2, 7):
        close(nearest_neighbor_mixing(x, f=f), ref_nnm(x, f), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bucketing_matches_the_reference(dtype):
    x = shifted(9, 13, dtype)
    for s in (1, 2, 4, 9, 20):
        got = bucketing(x, s=s, generator=torch.Generator().manual_seed(5))
        assert got.shape == (math.ceil(9 / s), 13)
        close(got, ref_bucketing(x, s, 5), dtype)


def test_pairwise_distances_are_exact_on_shifted_data(blocks):
    x = shifted(6, 1000, torch.float32)
    got = pairwise_sq_distances(x)
    xs = x.double()
    ref = ((xs[:, None, :] - xs[None, :, :]) ** 2).sum(-1)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-12)
    # the raw float32 identity |x|^2 + |y|^2 - 2 x.y, as Flower's Krum takes it
    raw = x.square().sum(1)
    flower = raw[:, None] + raw[None, :] - 2 * x @ x.T
    assert (flower.double() - ref).abs().max() > 10 * (got - ref).abs().max()


# ------------------------------------------------------------------- properties


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 7), d=st.integers(1, 6), seed=st.integers(0, 2**31))
def test_permutation_and_translation(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    perm = torch.randperm(n, generator=g)
    shift = torch.randn(d, generator=g, dtype=torch.float64) * 10
    c = torch.zeros(d, dtype=torch.float64)
    cc = centered_clipping(x, center=c, tau=0.7, iterations=2)
    torch.testing.assert_close(
        centered_clipping(x[perm], center=c, tau=0.7, iterations=2), cc
    )
    torch.testing.assert_close(
        centered_clipping(x + shift, center=c + shift, tau=0.7, iterations=2),
        cc + shift,
    )
    gm = geometric_median(x, iterations=30, tol=0)
    torch.testing.assert_close(geometric_median(x[perm], iterations=30, tol=0), gm)
    torch.testing.assert_close(
        geometric_median(x + shift, iterations=30, tol=0), gm + shift
    )
    f = n // 3
    mixed = nearest_neighbor_mixing(x, f=f)
    torch.testing.assert_close(nearest_neighbor_mixing(x[perm], f=f), mixed[perm])
    torch.testing.assert_close(nearest_neighbor_mixing(x + shift, f=f), mixed + shift)
    gen = lambda: torch.Generator().manual_seed(seed)  # noqa: E731
    torch.testing.assert_close(
        bucketing(x + shift, s=2, generator=gen()),
        bucketing(x, s=2, generator=gen()) + shift,
    )


@settings(max_examples=30, deadline=None)
@given(n=st.integers(3, 9), d=st.integers(1, 5), seed=st.integers(0, 2**31))
def test_geometric_median_objective_beats_median_and_mean(n, d, seed):
    x = torch.randn(
        n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )
    x[0] *= 50  # an outlier

    def objective(z):
        return float(torch.linalg.vector_norm(x - z, dim=1).sum())

    gm = geometric_median(x, nu=1e-10, iterations=500, tol=0)
    assert objective(gm) <= objective(x.median(0).values) + 1e-9
    assert objective(gm) <= objective(x.mean(0)) + 1e-9


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 6), d=st.integers(1, 5), seed=st.integers(0, 2**31))
def test_centered_clipping_with_a_huge_tau_is_the_mean(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    center = torch.randn(d, generator=g, dtype=torch.float64)
    got = centered_clipping(x, center=center, tau=1e12)
    torch.testing.assert_close(got, x.mean(0))


# ------------------------------------------------------------------- edge cases


def test_edge_cases():
    x = torch.zeros(3, 0)
    assert centered_clipping(x, center=torch.zeros(0), tau=1.0).shape == (0,)
    assert geometric_median(x).shape == (0,)
    assert nearest_neighbor_mixing(x, f=1).shape == (3, 0)
    assert bucketing(x, s=2).shape == (2, 0)
    one = torch.tensor([[1.0, -2.0]])
    torch.testing.assert_close(geometric_median(one), one[0])
    torch.testing.assert_close(nearest_neighbor_mixing(one, f=0), one)
    same = torch.ones(4, 3)  # every row at the centre: contributes 0, never NaN
    torch.testing.assert_close(
        centered_clipping(same, center=torch.ones(3), tau=1.0), torch.ones(3)
    )
    torch.testing.assert_close(geometric_median(same), torch.ones(3))
    x = torch.randn(5, 4)
    torch.testing.assert_close(nearest_neighbor_mixing(x, f=0), x.mean(0).expand(5, 4))
    torch.testing.assert_close(bucketing(x, s=5), x.mean(0, keepdim=True))


def test_inputs_are_never_modified():
    x = torch.randn(5, 4)
    center, weights = torch.randn(4), torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    before = (x.clone(), center.clone(), weights.clone())
    centered_clipping(x, center=center, tau=0.1, iterations=3)
    geometric_median(x, weights=weights)
    nearest_neighbor_mixing(x, f=2)
    bucketing(x, s=2)
    for a, b in zip((x, center, weights), before, strict=True):
        assert torch.equal(a, b)


X = torch.randn(4, 3)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (
            lambda: centered_clipping([[1.0]], center=X[0], tau=1),
            TypeError,
            "`x` to be a floating-point torch.Tensor, got list",
        ),
        (
            lambda: centered_clipping(X.long(), center=X[0], tau=1),
            TypeError,
            "got dtype torch.int64",
        ),
        (
            lambda: centered_clipping(X[0], center=X[0], tau=1),
            ValueError,
            r"shape \(n, d\) with n >= 1, got \(3,\)",
        ),
        (lambda: geometric_median(torch.ones(0, 3)), ValueError, r"got \(0, 3\)"),
        (
            lambda: centered_clipping(X, center=X[0, :2], tau=1),
            ValueError,
            r"`center` of shape \(3,\), got \(2,\)",
        ),
        (
            lambda: centered_clipping(X, center=X[0].double(), tau=1),
            ValueError,
            "`center` of dtype torch.float32",
        ),
        (
            lambda: centered_clipping(X, center=X[0], tau=0),
            ValueError,
            "finite `tau` > 0, got 0.0",
        ),
        (
            lambda: centered_clipping(X, center=X[0], tau=float("nan")),
            ValueError,
            "`tau` > 0, got nan",
        ),
        (
            lambda: centered_clipping(X, center=X[0], tau=True),
            TypeError,
            "`tau` to be a real number, got True",
        ),
        (
            lambda: centered_clipping(X, center=X[0], tau=1, iterations=0),
            ValueError,
            "`iterations` >= 1, got 0",
        ),
        (
            lambda: centered_clipping(X, center=X[0], tau=1, iterations=1.0),
            TypeError,
            "`iterations` to be an integer >= 1, got 1.0",
        ),
        (lambda: geometric_median(X, nu=0), ValueError, "finite `nu` > 0, got 0.0"),
        (
            lambda: geometric_median(X, tol=-1),
            ValueError,
            "finite `tol` >= 0, got -1.0",
        ),
        (
            lambda: geometric_median(X, weights=torch.ones(3)),
            ValueError,
            r"`weights` of shape \(4,\), got \(3,\)",
        ),
        (
            lambda: geometric_median(X, weights=torch.zeros(4)),
            ValueError,
            "not all zero",
        ),
        (
            lambda: geometric_median(X, weights=torch.tensor([1.0, -1, 1, 1])),
            ValueError,
            "non-negative",
        ),
        (
            lambda: geometric_median(
                X, weights=torch.tensor([1.0, float("nan"), 1, 1])
            ),
            ValueError,
            "finite",
        ),
        (
            lambda: nearest_neighbor_mixing(X, f=4),
            ValueError,
            r"`f` in \[0, 3\], got 4",
        ),
        (
            lambda: nearest_neighbor_mixing(X, f=False),
            TypeError,
            "`f` to be a non-negative integer, got False",
        ),
        (lambda: bucketing(X, s=0), ValueError, "`s` >= 1, got 0"),
        (
            lambda: bucketing(X, s=2, generator=3),
            TypeError,
            "CPU torch.Generator, got 3",
        ),
    ],
)
def test_errors_name_the_argument_and_echo_the_value(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_cuda_matches_cpu():
    x = shifted(8, 101, torch.float32)
    for fn in (
        lambda t: centered_clipping(t, center=t[0], tau=1e-3, iterations=2),
        lambda t: geometric_median(t, iterations=10, tol=0),
        lambda t: nearest_neighbor_mixing(t, f=2),
        lambda t: bucketing(t, s=3, generator=torch.Generator().manual_seed(1)),
    ):
        got = fn(x.cuda())
        assert got.device.type == "cuda"
        torch.testing.assert_close(got.cpu(), fn(x), rtol=1e-5, atol=1e-6)
