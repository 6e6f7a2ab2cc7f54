import dataclasses
import math

import pytest

from flwr_alie.evaluation.grid import (
    Cell,
    build_grid,
    byzantine_ids,
    count_for,
    load_cells,
    save_cells,
)
from flwr_alie.evaluation.results import (
    is_finished,
    paired_table,
    plot_accuracy,
    plot_effect,
    read_rows,
)
from flwr_alie.evaluation.stats import mean_interval, paired_difference
from flwr_alie.evaluation.strategies import make_strategy
from flwr_alie.evaluation.wire import row_columns as describe

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_every_attacked_cell_has_its_paired_reference():
    cells = build_grid(
        strategies=["krum", "fedmedian"],
        fractions=[0.1, 0.2],
        zs=["max", 1.5],
        splits=["iid", "dirichlet"],
        seeds=[0, 1],
    )
    keys = {c.key for c in cells}
    assert len(keys) == len(cells)
    attacked = [c for c in cells if c.attacked]
    assert len(attacked) == 2 * 2 * 2 * 2 * 2  # strategies, splits, seeds, f, z
    for cell in attacked:
        reference = cell.reference()
        assert reference.key in keys
        # configured exactly as the attacked cell, all clients honest
        assert reference.declared == cell.declared
        assert (
            make_strategy(
                cell.strategy, num_nodes=20, num_byzantine=cell.declared
            ).__dict__
            == make_strategy(
                reference.strategy, num_nodes=20, num_byzantine=reference.declared
            ).__dict__
        )
        assert not reference.attacked
        assert cell.fedavg_reference().key in keys
    krum = [c for c in attacked if c.strategy == "krum"]
    assert {c.declared for c in krum} == {2, 4}  # configured for the f it faces
    median = [c for c in cells if c.strategy == "fedmedian" and not c.attacked]
    assert {c.declared for c in median} == {0}  # one reference serves every f


def test_cells_of_a_seed_share_byzantine_ids_and_task():
    cells = build_grid(strategies=["krum", "bulyan"], zs=[0.0, 1.5], seeds=[3, 4])
    for seed in (3, 4):
        ids = {c.byzantine_ids for c in cells if c.seed == seed and c.attacked}
        assert ids == {byzantine_ids(seed, 20, 4)}
    assert byzantine_ids(3, 20, 4) != byzantine_ids(4, 20, 4)
    # what the initial model, partitions and minibatches derive from
    assert {(c.seed, c.dataset, c.clients, c.split, c.alpha) for c in cells} == {
        (3, "digits", 20, "iid", 0.5),
        (4, "digits", 20, "iid", 0.5),
    }


def test_byzantine_ids_are_nested_across_fractions():
    assert set(byzantine_ids(0, 20, 2)) < set(byzantine_ids(0, 20, 4))
    assert len(byzantine_ids(0, 20, 4)) == 4


def test_cells_round_trip_through_json(tmp_path):
    cells = build_grid(strategies=["bulyan"], zs=[1.0], rounds=3, clients=7, seeds=[0])
    save_cells(cells, tmp_path / "grid.json")
    assert load_cells(tmp_path / "grid.json") == cells


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"strategies": ["fedprox"]}, ValueError, "strategy among .* got 'fedprox'"),
        ({"directions": ["down"]}, ValueError, "'down' is not a valid Direction"),
        ({"zs": [-1.0]}, ValueError, r"Expected `z` >= 0, got -1.0"),
        ({"zs": ["min"]}, TypeError, "got 'min'"),
        ({"seeds": [1, 1]}, ValueError, r"--seeds must be distinct, got \[1, 1\]"),
        (
            {"fractions": [0.2], "clients": 2},
            ValueError,
            (
                r"--fractions 0.2 gives round\(0.2 \* 2\) = 0 .* nearest valid "
                r"fraction is 0.5"
            ),
        ),
        ({"fractions": [0.5], "clients": 4}, ValueError, "not a minority"),
    ],
)
def test_bad_grid(kwargs, error, match):
    with pytest.raises(error, match=match):
        build_grid(**{"strategies": ["krum"], **kwargs})


def test_count_for_rounds_and_names_the_nearest_valid_fraction():
    assert count_for(0.2, 20) == 4
    assert count_for(0.1, 20) == 2
    with pytest.raises(ValueError, match=r"nearest valid fraction is 0\.05"):
        count_for(0.02, 20)


def test_invalid_configurations_are_known_before_the_run():
    cells = build_grid(strategies=["bulyan"], zs=["max"], clients=10, seeds=[0])
    bulyan = next(c for c in cells if c.strategy == "bulyan" and c.attacked)
    assert bulyan.problems() == [
        "Bulyan needs n >= 4 * num_malicious_nodes + 3 = 11 nodes, got n = 10"
    ]
    # z_max with f = 2 of n = 10 is 0: valid, the null attack
    fedavg = dataclasses.replace(bulyan, strategy="fedavg", declared=0)
    assert fedavg.problems() == []
    one = dataclasses.replace(fedavg, byzantine_ids=(3,))
    assert "No non-negative ALIE factor" in one.problems()[0]


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


def test_interval_against_a_hand_computed_case():
    # differences 0.1, 0.3, 0.2: mean 0.2, sample sd 0.1, t(0.975, 2) = 4.302653
    interval = paired_difference({0: 0.9, 1: 0.8, 2: 0.7}, {0: 0.8, 1: 0.5, 2: 0.5})
    half = 4.302652729911275 * 0.1 / math.sqrt(3)
    assert interval.mean == pytest.approx(0.2)
    assert interval.low == pytest.approx(0.2 - half)
    assert interval.high == pytest.approx(0.2 + half)
    assert not interval.significant  # 0.2 - 0.248 < 0: the interval holds 0


def test_significance_needs_the_interval_to_exclude_zero():
    assert not mean_interval([0.1, 0.3, 0.2 - 0.6]).significant
    assert mean_interval([-0.30, -0.31, -0.29]).significant
    one = mean_interval([0.5])
    assert (one.low, one.high, one.significant) == (None, None, False)


def test_paired_difference_uses_shared_seeds_only():
    interval = paired_difference({0: 1.0, 1: 2.0, 5: 9.0}, {0: 0.5, 1: 1.0})
    assert interval.count == 2
    assert interval.mean == pytest.approx(0.75)


def _rows(cell: Cell, curve: list[float]) -> list[dict]:
    base = describe(cell)
    return [
        {**base, "round": r, "accuracy": a, "status": "ok"} for r, a in enumerate(curve)
    ]


def _grid_rows() -> tuple[list[dict], list[Cell]]:
    cells = build_grid(strategies=["krum"], zs=[1.5], rounds=2, seeds=[0, 1, 2])
    rows: list[dict] = []
    for cell in cells:
        s = cell.seed
        if cell.strategy == "fedavg":
            curve = [0.1, 0.5, 0.90 + 0.01 * s]
        elif cell.attacked:
            curve = [0.1, 0.4, 0.50 + 0.02 * s]
        else:
            curve = [0.1, 0.5, 0.80 + 0.01 * s]
        rows += _rows(cell, curve)
    return rows, cells


def test_table_pairs_each_attacked_cell_with_its_reference():
    rows, _ = _grid_rows()
    table = paired_table(rows, last=1)
    lines = table.splitlines()
    assert lines[0] == (
        "| strategy | split | f | clean | cost vs FedAvg | z=1.5 | effect of z=1.5 |"
    )
    # last round only: clean krum 0.80, 0.81, 0.82; attacked 0.50, 0.52, 0.54
    effect = mean_interval([-0.30, -0.29, -0.28])
    cost = mean_interval([-0.1, -0.1, -0.1])
    krum = next(line for line in lines if line.startswith("| krum"))
    cells = [c.strip() for c in krum.strip("|").split("|")]
    assert cells[:3] == ["krum", "iid", "4/20"]
    assert cells[3] == f"0.810 ± {mean_interval([0.8, 0.81, 0.82]).half_width:.3f}"
    assert cells[4].startswith(f"{cost.mean:+.3f}")
    assert cells[6] == (f"{effect.mean:+.3f} [{effect.low:+.3f}, {effect.high:+.3f}] *")


def test_metric_averages_the_last_rounds():
    rows, _ = _grid_rows()
    two = paired_table(rows, last=2)
    krum = next(line for line in two.splitlines() if line.startswith("| krum"))
    # clean krum: mean of (0.5, 0.80 + 0.01 s) over s = 0, 1, 2 -> 0.655
    assert "| 0.655 ±" in krum


def test_failed_and_unfinished_cells_are_not_counted():
    rows, cells = _grid_rows()
    attacked = next(c for c in cells if c.attacked and c.seed == 2)
    rows = [r for r in rows if not (r["cell"] == attacked.key and r["round"] == 2)]
    assert not is_finished(rows, attacked.key, attacked.rounds)
    table = paired_table(rows, last=1)
    krum = next(line for line in table.splitlines() if line.startswith("| krum"))
    assert "0.510 ±" in krum  # seeds 0 and 1 only


def test_invalid_cells_are_footnoted_with_their_split():
    cell = build_grid(strategies=["bulyan"], zs=[1.0], clients=10, seeds=[0])[1]
    rows = [{**describe(cell), "round": None, "status": "invalid", "reason": "n<11"}]
    rows += [
        {
            **describe(cell.reference()),
            "round": None,
            "status": "invalid",
            "reason": "n",
        }
    ]
    table = paired_table(rows, last=1)
    assert "invalid (1)" in table
    assert "invalid (2)" in table
    lines = table.splitlines()
    assert "1. bulyan (iid, clean, f=2/10): invalid: n" in lines
    assert "2. bulyan (iid, z=1.0, f=2/10): invalid: n<11" in lines


def test_plots_are_png_files(tmp_path):
    rows, _ = _grid_rows()
    plot_accuracy(rows, tmp_path / "accuracy.png", last=1)
    plot_effect(rows, tmp_path / "effect.png", last=1)
    for name in ("accuracy.png", "effect.png"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE)
        assert len(data) > 5000


def test_a_line_cut_short_is_skipped(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text('{"cell": "a", "round": 1}\n{"cell": "b", "rou')
    assert read_rows(path) == [{"cell": "a", "round": 1}]


def test_attacks_that_differ_in_one_option_are_compared_by_seed():
    from flwr_alie.evaluation.results import attack_contrasts

    cells = build_grid(
        strategies=["fedmedian"], zs=[1.5, "max"],
        knowledge=["oracle", "byzantine-only"], rounds=1, seeds=[0, 1, 2],
    )  # fmt: skip
    final = {  # last-round accuracy of each attack, plus the seed / 100
        (1.5, "oracle"): 0.50, (1.5, "byzantine-only"): 0.60,
        ("max", "oracle"): 0.70, ("max", "byzantine-only"): 0.75,
    }  # fmt: skip
    rows: list[dict] = []
    for cell in cells:
        top = final.get((cell.z, cell.knowledge), 0.9) + cell.seed / 100
        if cell.attacked and cell.knowledge == "byzantine-only" and cell.z == 1.5:
            top += (cell.seed - 1) / 50  # a spread across seeds: an interval
        rows += _rows(cell, [0.1, top])
    table = attack_contrasts(rows, last=1)
    lines = {line.split("|")[4].strip(): line for line in table.splitlines()[2:]}
    assert set(lines) == {
        "byzantine-only - oracle (z=1.5)",
        "byzantine-only - oracle (z=max)",
        "z=max - z=1.5 (oracle)",
        "z=max - z=1.5 (byzantine-only)",
    }
    spread = mean_interval([0.1 - 0.02, 0.1, 0.1 + 0.02])
    assert lines["byzantine-only - oracle (z=1.5)"].split("|")[5].strip() == (
        f"{spread.mean:+.3f} [{spread.low:+.3f}, {spread.high:+.3f}] *"
    )
    assert "| fedmedian | iid | 4/20 |" in lines["z=max - z=1.5 (oracle)"]
    assert "+0.200" in lines["z=max - z=1.5 (oracle)"]
    assert "+0.050" in lines["byzantine-only - oracle (z=max)"]
    assert attack_contrasts(_grid_rows()[0], last=1) == ""  # one attack: nothing
