"""ALIEAttack against hand-worked values, a naive float64 reference, and properties."""

import math

import pytest
import scipy.stats
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flwr_alie import ALIEAttack, Attack, Direction, z_max
from flwr_alie.attacks import stats as stats_module
from tests.conftest import DTYPES, TOLERANCES

GOLDEN = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
SQRT6 = math.sqrt(6.0)


def reference_alie(rows: list[list[float]], f: int, z: float, direction: Direction):
    """Deliberately naive float64 ALIE: Python loops, population variance."""
    h, d = len(rows), len(rows[0])
    b = []
    for j in range(d):
        column = [float(rows[i][j]) for i in range(h)]
        mu = sum(column) / h
        sigma = math.sqrt(sum((c - mu) ** 2 for c in column) / h)
        if direction is Direction.NEGATIVE:
            b.append(mu - z * sigma)
        elif direction is Direction.POSITIVE:
            b.append(mu + z * sigma)
        else:
            sign = (mu > 0) - (mu < 0)
            b.append(mu - z * sigma * sign)
    return torch.tensor([b] * f, dtype=torch.float64).reshape(f, d)


def reference_z_max(n: int, f: int) -> float:
    h = n - f
    s = n // 2 + 1 - f
    return float(scipy.stats.norm.ppf((h - s) / h))


def random_honest(h: int, d: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(d, generator=g, dtype=torch.float64) * 2 + 0.1
    shift = torch.randn(d, generator=g, dtype=torch.float64)
    return (torch.randn(h, d, generator=g, dtype=torch.float64) * scale + shift).to(
        dtype
    )


# ---------------------------------------------------------------- golden values


@pytest.mark.parametrize(
    ("direction", "expected"),
    [
        (Direction.NEGATIVE, [4 - SQRT6, 5 - SQRT6, 6 - SQRT6]),
        (Direction.POSITIVE, [4 + SQRT6, 5 + SQRT6, 6 + SQRT6]),
        # every mean is positive, so each coordinate moves down
        (Direction.OPPOSITE_MEAN, [4 - SQRT6, 5 - SQRT6, 6 - SQRT6]),
    ],
)
def test_golden_three_rows(direction, expected):
    out = ALIEAttack.generate(GOLDEN, f=2, z=1.0, direction=direction)
    torch.testing.assert_close(out, torch.tensor([expected, expected]))


def test_golden_uses_population_std():
    # rows 0 and 2: population std 1 (the sample std would be sqrt(2))
    out = ALIEAttack.generate(torch.tensor([[0.0], [2.0]]), f=1, z=1.0)
    assert out.item() == 0.0


def test_golden_opposite_mean_follows_the_sign_of_each_mean():
    honest = torch.tensor([[-1.0, 0.0, 1.0], [-3.0, 0.0, 3.0]])
    # mu = [-2, 0, 2], sigma = [1, 0, 1]
    out = ALIEAttack.generate(honest, f=1, z=1.0, direction=Direction.OPPOSITE_MEAN)
    torch.testing.assert_close(out, torch.tensor([[-1.0, 0.0, 1.0]]))


@pytest.mark.parametrize(
    ("n", "f", "expected"),
    [
        (10, 2, 0.0),
        (10, 3, 0.1800),
        (25, 5, 0.2533),
        (50, 10, 0.2533),
        (51, 12, 0.3612),
        (60, 18, 0.4972),
    ],
)
def test_z_max_worked_values(n, f, expected):
    honest = torch.zeros(n - f, 4)
    assert round(ALIEAttack.max_z(honest, f).item(), 4) == expected
    assert round(z_max(n - f, f), 4) == expected


def test_z_max_rejects_too_few_attackers():
    with pytest.raises(ValueError, match=r"\(h - s\) / h = \(9 - 5\) / 9 = 0.4444"):
        ALIEAttack.max_z(torch.zeros(9, 4), 1)


@pytest.mark.parametrize("n", [3, 4, 5, 10, 11, 25, 50, 100, 101, 1000])
def test_z_max_matches_scipy_for_every_valid_f(n):
    for f in range(n):
        h = n - f
        s = n // 2 + 1 - f
        if 2 * (h - s) < h:
            with pytest.raises(ValueError, match="No non-negative ALIE factor"):
                z_max(h, f)
        elif s <= 0:
            with pytest.raises(ValueError, match=r"unbounded .* majority on their own"):
                z_max(h, f)
        else:
            assert z_max(h, f) == pytest.approx(reference_z_max(n, f), abs=1e-12)


def test_z_max_is_used_for_z_max_string():
    honest = random_honest(7, 5, seed=1)
    expected = reference_alie(
        honest.tolist(), 3, reference_z_max(10, 3), Direction.NEGATIVE
    )
    torch.testing.assert_close(ALIEAttack.generate(honest, f=3), expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_max_z_dtype_and_device(dtype, device):
    z = ALIEAttack.max_z(torch.zeros(7, 2, dtype=dtype, device=device), f=3)
    assert z.dim() == 0
    assert z.dtype == dtype
    assert z.device.type == device.type


# ---------------------------------------------------------------- reference


@pytest.fixture
def small_blocks(monkeypatch):
    """Make column blocks tiny so that several blocks and a ragged one are used."""
    monkeypatch.setattr(stats_module, "_CPU_BLOCK_BYTES", 96)
    monkeypatch.setattr(stats_module, "_DEVICE_BLOCK_BYTES", 96)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("direction", list(Direction))
@pytest.mark.parametrize("blocks", ["one", "many"])
@pytest.mark.parametrize(
    ("h", "d", "f", "z"), [(5, 37, 2, 1.5), (13, 101, 4, 0.7), (2, 9, 1, 3.0)]
)
def test_matches_float64_reference(
    dtype, direction, blocks, h, d, f, z, device, request
):
    if blocks == "many":
        request.getfixturevalue("small_blocks")
    honest = random_honest(h, d, seed=h * d + f, dtype=dtype).to(device)
    expected = reference_alie(honest.double().tolist(), f, z, direction)
    out = ALIEAttack.generate(honest, f=f, z=z, direction=direction)
    assert out.dtype == dtype
    assert out.device == honest.device
    assert out.shape == (f, d)
    torch.testing.assert_close(out.double().cpu(), expected, **TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_sequence_input_equals_matrix_input(dtype, device, small_blocks):
    honest = random_honest(6, 50, seed=3, dtype=dtype).to(device)
    from_rows = ALIEAttack.generate(list(honest), f=3, z=1.0)
    from_matrix = ALIEAttack.generate(honest, f=3, z=1.0)
    torch.testing.assert_close(from_rows, from_matrix, rtol=0, atol=0)


def test_half_precision_is_accumulated_in_float32():
    # 4096 rows of 1.0 and one of 4097.0: a float16 accumulator would round the sum
    honest = torch.ones(4097, 1, dtype=torch.float16)
    honest[-1] = 2048.0
    expected = reference_alie(honest.double().tolist(), 1, 1.0, Direction.POSITIVE)
    out = ALIEAttack.generate(honest, f=1, z=1.0, direction=Direction.POSITIVE)
    torch.testing.assert_close(out.double(), expected, **TOLERANCES[torch.float16])


def test_nan_propagates_to_its_coordinate_only():
    honest = random_honest(4, 3, seed=2, dtype=torch.float32)
    honest[1, 1] = float("nan")
    out = ALIEAttack.generate(honest, f=2, z=1.0)
    assert torch.isnan(out[:, 1]).all()
    assert torch.isfinite(out[:, [0, 2]]).all()


# ---------------------------------------------------------------- properties

shapes = st.tuples(st.integers(1, 12), st.integers(0, 40), st.integers(0, 5))
factors = st.floats(0.0, 5.0, allow_nan=False)
directions = st.sampled_from(list(Direction))
seeds = st.integers(0, 2**31 - 1)


@settings(max_examples=60, deadline=None)
@given(shape=shapes, z=factors, direction=directions, seed=seeds)
def test_permuting_honest_rows_changes_nothing(shape, z, direction, seed):
    h, d, f = shape
    honest = random_honest(h, d, seed)
    perm = torch.randperm(h, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(
        ALIEAttack.generate(honest[perm], f=f, z=z, direction=direction),
        ALIEAttack.generate(honest, f=f, z=z, direction=direction),
    )


@settings(max_examples=60, deadline=None)
@given(shape=shapes, z=factors, direction=directions, seed=seeds)
def test_identical_rows_give_the_row(shape, z, direction, seed):
    h, d, f = shape
    row = random_honest(1, d, seed)
    out = ALIEAttack.generate(row.expand(h, d), f=f, z=z, direction=direction)
    torch.testing.assert_close(out, row.expand(f, d))


@settings(max_examples=60, deadline=None)
@given(shape=shapes, direction=directions, seed=seeds)
def test_zero_factor_gives_the_mean(shape, direction, seed):
    h, d, f = shape
    honest = random_honest(h, d, seed)
    out = ALIEAttack.generate(honest, f=f, z=0, direction=direction)
    torch.testing.assert_close(out, honest.mean(0).expand(f, d))


@settings(max_examples=60, deadline=None)
@given(
    shape=shapes,
    z=factors,
    direction=st.sampled_from([Direction.NEGATIVE, Direction.POSITIVE]),
    a=st.floats(0.01, 100.0),
    b=st.floats(-100.0, 100.0),
    seed=seeds,
)
def test_affine_equivariance(shape, z, direction, a, b, seed):
    h, d, f = shape
    honest = random_honest(h, d, seed)
    moved = ALIEAttack.generate(a * honest + b, f=f, z=z, direction=direction)
    expected = a * ALIEAttack.generate(honest, f=f, z=z, direction=direction) + b
    torch.testing.assert_close(moved, expected, rtol=1e-9, atol=1e-9 * (a + abs(b)))


@settings(max_examples=60, deadline=None)
@given(shape=shapes, z=factors, a=st.floats(0.01, 100.0), seed=seeds)
def test_opposite_mean_is_scale_equivariant(shape, z, a, seed):
    h, d, f = shape
    honest = random_honest(h, d, seed)
    direction = Direction.OPPOSITE_MEAN
    moved = ALIEAttack.generate(a * honest, f=f, z=z, direction=direction)
    expected = a * ALIEAttack.generate(honest, f=f, z=z, direction=direction)
    torch.testing.assert_close(moved, expected, rtol=1e-9, atol=1e-12 * a)


@settings(max_examples=40, deadline=None)
@given(shape=shapes, z=factors, direction=directions, seed=seeds, as_rows=st.booleans())
def test_input_is_never_modified(shape, z, direction, seed, as_rows):
    h, d, f = shape
    honest = random_honest(h, d, seed, dtype=torch.float32)
    before = honest.clone()
    ALIEAttack.generate(
        list(honest) if as_rows else honest, f=f, z=z, direction=direction
    )
    assert torch.equal(honest, before)


@settings(max_examples=40, deadline=None)
@given(shape=shapes, z=factors, direction=directions, seed=seeds)
def test_out_is_returned_and_filled(shape, z, direction, seed):
    h, d, f = shape
    honest = random_honest(h, d, seed)
    out = torch.full((f, d), float("nan"), dtype=torch.float64)
    result = ALIEAttack.generate(honest, out, f=f, z=z, direction=direction)
    assert result is out
    torch.testing.assert_close(
        out, ALIEAttack.generate(honest, f=f, z=z, direction=direction)
    )


def test_out_may_be_a_strided_view(small_blocks):
    honest = random_honest(5, 20, seed=4, dtype=torch.float32)
    storage = torch.zeros(20, 3)
    out = storage.T  # (3, 20), not contiguous
    assert ALIEAttack.generate(honest, out, f=3, z=1.0) is out
    torch.testing.assert_close(out, ALIEAttack.generate(honest, f=3, z=1.0))


# ---------------------------------------------------------------- edge cases


def test_f_zero_returns_empty_even_with_z_max():
    honest = random_honest(9, 4, seed=0)  # with f = 0 no z_max exists
    out = ALIEAttack.generate(honest, f=0, z="max")
    assert out.shape == (0, 4)
    assert out.dtype == honest.dtype


def test_h_one_gives_the_row():
    honest = random_honest(1, 6, seed=5)
    out = ALIEAttack.generate(honest, f=3, z=2.0)
    torch.testing.assert_close(out, honest.expand(3, 6))


def test_d_zero():
    out = ALIEAttack.generate(torch.zeros(4, 0), f=2, z=1.0)
    assert out.shape == (2, 0)


def test_empty_vectors_in_a_sequence():
    out = ALIEAttack.generate([torch.zeros(0), torch.zeros(0)], f=1, z="max")
    assert out.shape == (1, 0)


# ---------------------------------------------------------------- errors


class _NotATensor:
    pass


ERRORS = [
    (
        {"honest": torch.zeros(3, 4, dtype=torch.int64)},
        TypeError,
        "floating-point .*int64",
    ),
    (
        {"honest": torch.zeros(3, 4, dtype=torch.bool)},
        TypeError,
        "floating-point .*bool",
    ),
    ({"honest": [torch.zeros(4), _NotATensor()]}, TypeError, r"honest_gradients\[1\]"),
    ({"honest": "abc"}, TypeError, "got str"),
    ({"honest": 3.0}, TypeError, "got float"),
    ({"z": True}, TypeError, r"`z` .* got True \(bool\)"),
    ({"z": "min"}, TypeError, r"`z` .*\"max\", got 'min'"),
    ({"z": None}, TypeError, r"`z` .* got None"),
    ({"z": torch.tensor(1.0)}, TypeError, r"`z` .*Tensor"),
    ({"z": -1.0}, ValueError, r"`z` >= 0, got -1.0"),
    ({"z": float("nan")}, ValueError, r"finite `z`, got nan"),
    ({"z": float("inf")}, ValueError, r"finite `z`, got inf"),
    ({"f": -1}, ValueError, r"`f` >= 0, got -1"),
    ({"f": 2.0}, TypeError, r"`f` .*integer, got 2.0 \(float\)"),
    ({"f": True}, TypeError, r"`f` .*integer, got True"),
    ({"direction": "negative"}, TypeError, r"`direction` .*Direction\('negative'\)"),
    ({"honest": []}, ValueError, "empty sequence"),
    ({"honest": torch.zeros(0, 4)}, ValueError, r"got shape \(0, 4\)"),
    (
        {"honest": [torch.zeros(3), torch.zeros(4)]},
        ValueError,
        r"\(3,\) at index 0 and \(4,\) at index 1",
    ),
    (
        {"honest": [torch.zeros(3), torch.zeros(3, dtype=torch.float64)]},
        ValueError,
        "one dtype",
    ),
    ({"honest": torch.zeros(2, 3, 4)}, ValueError, r"2-D .*shape \(2, 3, 4\)"),
    ({"honest": torch.zeros(4)}, ValueError, r"2-D .*shape \(4,\)"),
    (
        {"honest": [torch.zeros(2, 2)]},
        ValueError,
        r"honest_gradients\[0\].*1-D .*\(2, 2\)",
    ),
    (
        {"out": torch.zeros(3, 4)},
        ValueError,
        r"`out` of shape \(f, d\) = \(2, 4\), got \(3, 4\)",
    ),
    (
        {"out": torch.zeros(2, 4, dtype=torch.float64)},
        ValueError,
        "`out` of dtype torch.float32",
    ),
    ({"out": [[0.0] * 4] * 2}, TypeError, "`out` to be a torch.Tensor, got list"),
    (
        {"honest": torch.zeros(9, 4), "f": 1, "z": "max"},
        ValueError,
        r"No non-negative ALIE factor.*f = 1",
    ),
    ({"extra": {"gamma": 1.0}}, TypeError, r"unexpected keyword .*\['gamma'\]"),
]


@pytest.mark.parametrize(("args", "error", "match"), ERRORS)
def test_bad_input_raises(args, error, match):
    honest = args.get("honest", torch.zeros(8, 4))
    with pytest.raises(error, match=match):
        ALIEAttack.generate(
            honest,
            args.get("out"),
            f=args.get("f", 2),
            z=args.get("z", 1.0),
            direction=args.get("direction", Direction.NEGATIVE),
            **args.get("extra", {}),
        )


def test_out_sharing_memory_with_the_input_is_refused():
    honest = torch.zeros(4, 3)
    with pytest.raises(ValueError, match="`out` not to share memory"):
        ALIEAttack.generate(honest, honest[:2], f=2, z=1.0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_mixed_devices_are_refused():
    rows = [torch.zeros(3), torch.zeros(3, device="cuda")]
    with pytest.raises(ValueError, match="one device, got cpu at index 0 and cuda"):
        ALIEAttack.generate(rows, f=1, z=1.0)
    with pytest.raises(ValueError, match="`out` on device cpu"):
        ALIEAttack.generate(torch.zeros(2, 3), torch.zeros(1, 3, device="cuda"), f=1)


@pytest.mark.parametrize(
    ("h", "f", "error", "match"),
    [
        (0, 1, ValueError, "`h` >= 1"),
        (3, -1, ValueError, "`f` >= 0, got -1"),
        (3.0, 1, TypeError, "`h` to be a non-negative integer, got 3.0"),
    ],
)
def test_z_max_bad_input(h, f, error, match):
    with pytest.raises(error, match=match):
        z_max(h, f)


def test_attack_is_abstract():
    with pytest.raises(TypeError, match="abstract"):
        Attack()  # type: ignore[abstract]
