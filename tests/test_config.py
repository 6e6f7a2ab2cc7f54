import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flwr_alie import ALIEConfig, Direction


def test_defaults_follow_the_paper_authors_code():
    config = ALIEConfig()
    assert config.z == "max"
    assert config.direction is Direction.NEGATIVE
    assert config.knowledge == "oracle"
    assert config.skips_training


def test_from_run_config_parses_every_key():
    config = ALIEConfig.from_run_config(
        {
            "alie.z": 2,
            "alie.direction": "opposite-mean",
            "alie.knowledge": "byzantine-only",
            "alie.fraction": 0.25,
            "alie.byzantine-ids": "3, 1",
            "alie.seed": 7,
            "alie.skip-training": "auto",
            "alie.device": "cpu",
            "num-server-rounds": 3,  # not ours: ignored
        }
    )
    assert config == ALIEConfig(
        z=2.0,
        direction=Direction.OPPOSITE_MEAN,
        knowledge="byzantine-only",
        fraction=0.25,
        byzantine_ids=(3, 1),
        seed=7,
        skip_training=None,
        device="cpu",
    )
    assert not config.skips_training  # byzantine-only nodes must train


def test_from_run_config_does_not_modify_its_input():
    run_config = {"alie.z": "max", "alie.byzantine-ids": ""}
    before = dict(run_config)
    assert ALIEConfig.from_run_config(run_config).byzantine_ids is None
    assert run_config == before


@pytest.mark.parametrize(
    ("run_config", "error", "match"),
    [
        ({"alie.zz": 1.0}, ValueError, r"Unknown run-config key 'alie.zz'.*alie.z,"),
        ({"alie.z": -1.0}, ValueError, r"Expected `z` >= 0, got -1.0"),
        (
            {"alie.z": "min"},
            TypeError,
            r"`z` to be a real number or \"max\", got 'min'",
        ),
        ({"alie.direction": "down"}, ValueError, r"'alie.direction' in \['negative'"),
        ({"alie.knowledge": "full"}, ValueError, r"`knowledge` in .*got 'full'"),
        ({"alie.fraction": 1.0}, ValueError, r"`fraction` in \[0, 1\), got 1.0"),
        ({"alie.byzantine-ids": "1,x"}, ValueError, r"integer ids, got '1,x'"),
        ({"alie.skip-training": "yes"}, TypeError, r"true, false or 'auto', got 'yes'"),
        ({"alie.seed": 1.5}, TypeError, r"`seed` to be an int, got 1.5"),
        ({"alie.device": "tpu9"}, ValueError, r"`device` to be 'auto' or a torch"),
        (
            {"alie.knowledge": "byzantine-only", "alie.skip-training": True},
            ValueError,
            "must train",
        ),
    ],
)
def test_bad_run_config(run_config, error, match):
    with pytest.raises(error, match=match):
        ALIEConfig.from_run_config(run_config)


@pytest.mark.parametrize("n", [1, 5, 10, 20, 33])
@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.2, 0.45])
def test_byzantine_partitions_are_drawn_reproducibly(n, fraction):
    chosen = ALIEConfig(fraction=fraction, seed=11).byzantine_partitions(n)
    assert len(chosen) == round(fraction * n)
    assert chosen <= set(range(n))
    assert chosen == ALIEConfig(fraction=fraction, seed=11).byzantine_partitions(n)


def test_seeds_draw_different_partitions():
    draws = {
        ALIEConfig(fraction=0.3, seed=s).byzantine_partitions(20) for s in range(10)
    }
    assert len(draws) > 1


def test_explicit_ids_win_over_fraction():
    config = ALIEConfig(fraction=0.4, byzantine_ids=(2,))
    assert config.byzantine_partitions(10) == {2}


@settings(deadline=None)
@given(
    z=st.one_of(st.just("max"), st.floats(0, 10)),
    direction=st.sampled_from(list(Direction)),
    knowledge=st.sampled_from(["oracle", "byzantine-only"]),
    fraction=st.floats(0, 0.99),
    ids=st.one_of(st.none(), st.lists(st.integers(0, 500), min_size=1).map(tuple)),
    seed=st.integers(0, 2**31),
    skip=st.sampled_from([None, False]),
    device=st.sampled_from(["auto", "cpu"]),
)
def test_to_run_config_is_the_inverse_of_from_run_config(
    z, direction, knowledge, fraction, ids, seed, skip, device
):
    options = ALIEConfig(
        z=z, direction=direction, knowledge=knowledge, fraction=fraction,
        byzantine_ids=ids, seed=seed, skip_training=skip, device=device,
    )  # fmt: skip
    keys = options.to_run_config()
    assert all(k.startswith("alie.") for k in keys)
    assert ALIEConfig.from_run_config(keys) == options
