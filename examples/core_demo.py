"""ALIE on a toy round: ten honest updates, three crafted ones, and what they do.

Run with ``python examples/core_demo.py``. No Flower involved: only the torch core.
"""

import torch

from flwr_alie import ALIEAttack, Direction


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    h, f, d = 7, 3, 100_000
    # honest updates: a shared true gradient plus per-worker noise
    true_gradient = torch.randn(d, generator=gen)
    honest = true_gradient + 0.5 * torch.randn(h, d, generator=gen)
    z = ALIEAttack.max_z(honest, f)
    byzantine = ALIEAttack.generate(honest, f=f, z="max", direction=Direction.NEGATIVE)

    mu = honest.mean(0)
    sigma = honest.std(0, correction=0)
    everyone = torch.cat([honest, byzantine])
    median = everyone.median(0).values
    print(f"n = {h + f} workers, f = {f} Byzantine, d = {d:,} coordinates")
    print(f"z_max = {z.item():.4f}")
    offset = ((byzantine[0] - mu) / sigma).mean()
    cos_mean = torch.cosine_similarity(mu, true_gradient, 0)
    cos_median = torch.cosine_similarity(median, true_gradient, 0)
    print(f"crafted - mu, in sigmas (mean over coordinates): {offset:.4f}")
    print(f"cosine(honest mean, true gradient):            {cos_mean:.4f}")
    print(f"cosine(median under ALIE, true gradient):      {cos_median:.4f}")
    shift = ((median - mu) / sigma).mean()
    print(f"coordinate-wise median moved by {shift:.4f} sigma toward the attack")


if __name__ == "__main__":
    main()
