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


def test_mnist1d_is_generated_offline_deterministically_for_51_clients(monkeypatch):
    import random

    import numpy as np
    import requests

    def no_network(*args, **kwargs):
        raise AssertionError("MNIST-1D must not be downloaded")

    monkeypatch.setattr(requests, "get", no_network)
    load_data.cache_clear()
    random.seed(7)
    np.random.seed(7)
    before = (random.getstate(), np.random.get_state()[1].copy())
    first = load_data("mnist1d", 51, "iid", 0.5, 0)
    assert random.getstate() == before[0]  # the global generators are restored
    assert np.array_equal(np.random.get_state()[1], before[1])
    load_data.cache_clear()
    again = load_data("mnist1d", 51, "iid", 0.5, 0)
    assert first.num_features == 40
    assert first.num_classes == 10
    assert len(first.test) == 2000
    assert min(len(p) for p in first.partitions) >= 150  # a meaningful share each
    for a, b in zip(first.partitions, again.partitions, strict=True):
        assert torch.equal(a.x, b.x)
        assert torch.equal(a.y, b.y)
    model = make_model(first.num_features, first.num_classes)
    train(model, first.partitions[0], epochs=1, lr=0.1)
    _, accuracy = evaluate(model, first.test)
    assert 0.0 <= accuracy <= 1.0
