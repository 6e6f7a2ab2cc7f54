import math

import pytest

from flwr_alie.evaluation.grid import Cell, build_grid, load_cells, save_cells
from flwr_alie.evaluation.results import (
    final_accuracy_table,
    plot_accuracy,
    plot_heatmap,
)
from flwr_alie.evaluation.strategies import make_strategy

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_grid_has_one_no_attack_cell_per_strategy_split_and_seed():
    cells = build_grid(
        strategies=["krum", "fedavg"],
        fractions=[0.0, 0.1, 0.2],
        zs=["max", 1.5],
        splits=["iid", "dirichlet"],
        seeds=[0, 1],
    )
    assert len(cells) == 2 * 2 * 2 * (1 + 2 * 2)
    assert len({c.key for c in cells}) == len(cells)
    no_attack = [c for c in cells if not c.attacked]
    assert len(no_attack) == 2 * 2 * 2
    assert all(c.num_byzantine() == 0 for c in no_attack)


def test_cells_round_trip_through_json(tmp_path):
    cells = build_grid(strategies=["bulyan"], zs=[1.0], rounds=3, clients=7)
    save_cells(cells, tmp_path / "grid.json")
    assert load_cells(tmp_path / "grid.json") == cells


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"strategies": ["fedprox"]}, "strategies among .* got 'fedprox'"),
        ({"directions": ["down"]}, "'down' is not a valid Direction"),
        ({"zs": [-1.0]}, r"Expected `z` >= 0, got -1.0"),
    ],
)
def test_bad_grid(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_grid(**kwargs)


def test_byzantine_count_follows_the_fraction():
    cell = Cell("krum", 0.2, 1.0, "negative", "oracle", "iid", 3, clients=20)
    assert cell.num_byzantine() == 4


def test_strategies_are_configured_from_the_byzantine_count():
    assert (
        make_strategy("bulyan", num_nodes=20, num_byzantine=4).num_malicious_nodes == 4
    )
    multikrum = make_strategy("multikrum", num_nodes=20, num_byzantine=4)
    assert multikrum.num_nodes_to_select == 16
    # trim_mean cuts int(beta * n) from each end: exactly f
    for n, f in [(20, 4), (10, 1), (7, 3), (20, 0)]:
        beta = make_strategy("fedtrimmedavg", num_nodes=n, num_byzantine=f).beta
        assert int(beta * n) == f


def row(strategy, fraction, accuracy, *, z="max", rnd=3, seed=0, status="ok", **extra):
    return {
        "cell": f"{strategy}/{fraction}/{z}/{seed}",
        "strategy": strategy,
        "fraction": fraction,
        "z": z if fraction else "none",
        "direction": "negative" if fraction else "none",
        "knowledge": "oracle" if fraction else "none",
        "split": "iid",
        "seed": seed,
        "round": rnd,
        "accuracy": accuracy,
        "status": status,
        **extra,
    }


ROWS = [
    row("krum", 0.0, 0.10, rnd=2),  # an earlier round: not the final accuracy
    row("krum", 0.0, 0.90),
    row("krum", 0.2, 0.60, z=1.5),
    row("krum", 0.2, 0.80),
    row("fedavg", 0.0, 0.95),
    row("fedavg", 0.0, 0.85, seed=1),
    row("fedavg", 0.2, 0.70, z=1.5),
    row("fedavg", 0.2, 0.60, z=1.5, seed=1),
    {**row("fedavg", 0.2, None, rnd=None, status="invalid"), "reason": "no z_max"},
]


def test_table_shows_final_accuracy_and_the_drop_from_no_attack():
    table = final_accuracy_table(ROWS)
    lines = table.splitlines()
    assert lines[0] == "| strategy | no attack | f=0.2 z=1.5 | f=0.2 z=max |"
    assert lines[3] == "| krum | 0.900 | 0.600 (-0.300) | 0.800 (-0.100) |"
    mean, sd = 0.65, math.sqrt(0.005)
    assert lines[2] == (
        f"| fedavg | 0.900 ± {math.sqrt(0.005):.3f} | {mean:.3f} ± {sd:.3f} "
        f"({mean - 0.9:+.3f}) | invalid (1) |"
    )
    assert lines[-1] == "1. fedavg, f=0.2 z=max: no z_max"


def test_plots_are_png_files(tmp_path):
    plot_accuracy(ROWS, tmp_path / "accuracy.png")
    plot_heatmap(ROWS, tmp_path / "heatmap.png")
    for name in ("accuracy.png", "heatmap.png"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE)
        assert len(data) > 5000
