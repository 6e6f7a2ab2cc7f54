"""Exact coordinate-wise moments of an ``(h, d)`` matrix, from one read of it.

The statistics of ALIE (Baruch, Baruch and Goldberg, "A Little Is Enough", NeurIPS
2019): the mean ``mu`` and the population standard deviation ``sigma`` of the honest
updates, coordinate by coordinate.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flwr_alie._checks import accumulation_dtype

__all__ = ["moments"]

# Bytes of one column block, in the accumulation dtype. On the CPU a block stays in
# the caches (2 MiB of L2 per core here) while both moments are taken from it, so the
# input is read once from memory; elsewhere a block only bounds the temporary memory.
_CPU_BLOCK_BYTES = 4 << 20
_DEVICE_BLOCK_BYTES = 256 << 20


def moments(
    x: Tensor, /, *, out: tuple[Tensor, Tensor] | None = None
) -> tuple[Tensor, Tensor]:
    r"""Return the coordinate-wise mean and population standard deviation of `x`.

    For the rows :math:`x_1, \dots, x_h` of `x`,

    .. math::

        \mu = \frac{1}{h} \sum_{i=1}^{h} x_i, \qquad
        \sigma = \sqrt{\frac{1}{h} \sum_{i=1}^{h} (x_i - \mu)^2}
        \quad \text{(coordinate-wise)},

    with divisor ``h`` (the population standard deviation, as in the code of the
    ALIE paper's authors), not ``h - 1``.

    Parameters
    ----------
    x : Tensor
        Shape ``(h, d)`` with ``h >= 1``, floating point, on any device; never
        modified.
    out : tuple[Tensor, Tensor], optional
        Two ``(d,)`` tensors, in the accumulation dtype and on the device of `x`,
        to write ``mu`` and ``sigma`` into (and return): a caller that runs every
        round keeps them, sparing the page faults of two fresh ``d``-sized buffers.

    Returns
    -------
    tuple[Tensor, Tensor]
        ``(mu, sigma)``, each of shape ``(d,)`` on the device of `x`, in the
        accumulation dtype: float32 for float16, bfloat16 and float32 inputs,
        float64 for float64.

    Raises
    ------
    TypeError
        If `x` is not a floating-point tensor.
    ValueError
        If `x` is not 2-D or has no row, or `out` does not fit.

    Notes
    -----
    Exact two-pass moments (the mean first, then the squares of the centred values),
    taken over column blocks small enough to stay in cache: each block is read once
    from memory. No ``E[x^2] - E[x]^2`` shortcut, which loses every digit on updates
    that are small against their mean. NaN and infinity propagate to the
    coordinates they touch.

    Examples
    --------
    >>> import torch
    >>> mu, sigma = moments(torch.tensor([[1.0, 2.0], [3.0, 6.0]]))
    >>> mu, sigma
    (tensor([2., 4.]), tensor([1., 2.]))
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"Expected `x` to be a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"Expected a floating-point `x`, got dtype {x.dtype}")
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(
            f"Expected `x` of shape (h, d) with h >= 1, got {tuple(x.shape)}"
        )
    h, d = x.shape
    acc = accumulation_dtype(x.dtype)
    if out is None:
        mu = torch.empty(d, dtype=acc, device=x.device)
        sigma = torch.empty(d, dtype=acc, device=x.device)
    else:
        mu, sigma = out
        for name, t in (("out[0]", mu), ("out[1]", sigma)):
            if t.shape != (d,) or t.dtype != acc or t.device != x.device:
                raise ValueError(
                    f"Expected `{name}` of shape ({d},), dtype {acc} on {x.device}, "
                    f"got {tuple(t.shape)}, {t.dtype} on {t.device}"
                )
    on_cpu = x.device.type == "cpu"
    budget = _CPU_BLOCK_BYTES if on_cpu else _DEVICE_BLOCK_BYTES
    width = max(1, min(d, budget // (h * acc.itemsize)))
    buffer = torch.empty((h, width), dtype=acc, device=x.device)
    # On the CPU a GEMV sums columns faster than `sum(0)`.
    ones = torch.ones((1, h), dtype=acc, device=x.device)
    for start in range(0, d, width):
        block = x[:, start : start + width]
        w = block.shape[1]
        scratch = buffer[:, :w]
        if block.dtype != acc:
            block = scratch.copy_(block)
        mu_block = mu[start : start + w]
        _column_sum(block, ones, mu_block, on_cpu).div_(h)
        centred = torch.sub(block, mu_block, out=scratch).square_()
        _column_sum(centred, ones, sigma[start : start + w], on_cpu)
    sigma.div_(h).sqrt_()
    return mu, sigma


def _column_sum(block: Tensor, ones: Tensor, out: Tensor, on_cpu: bool) -> Tensor:
    if on_cpu:
        torch.mm(ones, block, out=out.view(1, -1))
    else:
        torch.sum(block, 0, out=out)
    return out
