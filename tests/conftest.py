import pytest
import torch

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]

# Tolerances of a result in `dtype` against a float64 reference, in units of the
# honest spread: the rounding of the output dtype dominates.
TOLERANCES = {
    torch.float16: {"rtol": 2e-3, "atol": 2e-3},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 1.6e-2},
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.float64: {"rtol": 1e-12, "atol": 1e-12},
}

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(
                not torch.cuda.is_available(), reason="no CUDA device here"
            ),
        ],
    ),
]


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    return torch.device(request.param)


@pytest.fixture
def server_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower stamps new instruction messages with the identity of the ServerApp."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in [("_run_id", 1), ("_node_id", 0), ("_task_id", 1)]:
        monkeypatch.setattr(TaskIdentity, name, value)
