from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from flwr_alie.evaluation.task import (
    evaluate,
    get_weights,
    load_data,
    make_model,
    train,
)


@pytest.mark.parametrize("split", ["iid", "dirichlet"])
def test_partitions_cover_the_training_split_once(split):
    data = load_data("digits", 10, split, 0.5, 0)
    sizes = [len(p) for p in data.partitions]
    assert sum(sizes) + len(data.test) == 1797
    assert len(data.test) == 1797 // 5
    assert min(sizes) >= 2
    assert (data.num_features, data.num_classes) == (64, 10)
    if split == "dirichlet":
        assert max(sizes) > 2 * min(sizes)  # skewed


def test_models_depend_on_their_seed_only_even_built_in_threads():
    def build(seed):
        torch.manual_seed(1234 + seed)  # the global RNG must not matter
        return get_weights(make_model(seed=seed % 2))

    with ThreadPoolExecutor(8) as pool:
        models = list(pool.map(build, range(16)))
    for i, weights in enumerate(models):
        reference = models[i % 2]
        assert all((weights[k] == reference[k]).all() for k in weights)
    assert not (models[0]["0.weight"] == models[1]["0.weight"]).all()


def test_training_is_deterministic_given_the_seed_and_learns():
    data = load_data("digits", 4, "iid", 0.5, 0)
    results = []
    for _ in range(2):
        model = make_model(seed=0)
        train(model, data.partitions[0], epochs=5, lr=0.5, seed=7)
        results.append(get_weights(model))
    assert all((results[0][k] == results[1][k]).all() for k in results[0])
    _, before = evaluate(make_model(seed=0), data.test)
    _, after = evaluate(model, data.test)
    assert after > before + 0.3
