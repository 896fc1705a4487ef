"""2-D target distributions with exact (or quadrature-exact) log-densities, for flow matching.

Each target samples with a ``torch.Generator`` (float32 points) and evaluates ``log_prob`` in
float64, so sample quality can be measured as the negative log-likelihood of a model's samples
under the true density. ``make_target(name, **kwargs)`` builds one by name (``TARGETS_2D``).
"""

from __future__ import annotations

import math
from typing import Any

import torch

_LOG_2PI = math.log(2 * math.pi)


class Target2D:
    """A 2-D distribution we can sample and whose log-density we can evaluate."""

    name = "target"

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class EightGaussians(Target2D):
    """Equal mixture of 8 isotropic Gaussians on a circle. The density is exact (closed form)."""

    name = "eight_gaussians"

    def __init__(self, radius: float = 2.0, std: float = 0.15):
        angles = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
        self.centers = radius * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
        self.std = std

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        component = torch.randint(0, 8, (n,), generator=generator)
        noise = torch.randn(n, 2, generator=generator, dtype=torch.float64)
        return (self.centers[component] + self.std * noise).float()

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return _isotropic_mixture_log_prob(x, self.centers, self.std)


def _isotropic_mixture_log_prob(x: torch.Tensor, centers: torch.Tensor, std: float,
                                chunk: int = 1024) -> torch.Tensor:
    """log (1/M) sum_j N(x; centers_j, std^2 I) for 2-D x, computed stably in float64 in chunks."""
    x = x.detach().to(dtype=torch.float64, device="cpu")
    centers = centers.to(torch.float64)
    log_norm = -_LOG_2PI - 2 * math.log(std) - math.log(len(centers))
    out = []
    for start in range(0, len(x), chunk):
        sq_dist = torch.cdist(x[start:start + chunk], centers) ** 2
        out.append(torch.logsumexp(-sq_dist / (2 * std ** 2), dim=1) + log_norm)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def _log_normal_cdf_difference(upper: torch.Tensor, lower: torch.Tensor) -> torch.Tensor:
    """log(Phi(upper) - Phi(lower)) for upper > lower, accurate far in either tail.

    Where both arguments are positive, uses Phi(b) - Phi(a) = Phi(-a) - Phi(-b) so both terms are
    small-tail probabilities that log_ndtr resolves.
    """
    flip = lower > 0
    hi = torch.where(flip, -lower, upper)
    lo = torch.where(flip, -upper, lower)
    log_hi, log_lo = torch.special.log_ndtr(hi), torch.special.log_ndtr(lo)
    return log_hi + torch.log1p(-torch.exp(log_lo - log_hi))


class Checkerboard(Target2D):
    """Uniform on the 8 'black' unit squares of a 4x4 board over [-2, 2]^2, blurred by N(0, blur^2 I).

    The blurred density is exact: (1/8) sum over squares of a product of normal-CDF differences.
    The blur keeps the density positive everywhere, so NLL of any sample is finite.
    """

    name = "checkerboard"

    def __init__(self, blur: float = 0.1):
        corners = [(-2.0 + i, -2.0 + j) for i in range(4) for j in range(4) if (i + j) % 2 == 0]
        self.lower_corners = torch.tensor(corners, dtype=torch.float64)  # (8, 2)
        self.blur = blur

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        square = torch.randint(0, len(self.lower_corners), (n,), generator=generator)
        uniform = torch.rand(n, 2, generator=generator, dtype=torch.float64)
        noise = torch.randn(n, 2, generator=generator, dtype=torch.float64)
        return (self.lower_corners[square] + uniform + self.blur * noise).float()

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().to(dtype=torch.float64, device="cpu")[:, None, :]  # (n, 1, 2)
        upper = (self.lower_corners + 1.0 - x) / self.blur  # (n, 8, 2)
        lower = (self.lower_corners - x) / self.blur
        per_square = _log_normal_cdf_difference(upper, lower).sum(dim=2)  # square area is 1
        return torch.logsumexp(per_square, dim=1) - math.log(len(self.lower_corners))


class _NoisyCurves(Target2D):
    """Pick one of ``num_arms`` curves uniformly, t ~ U[0, 1], return curve(arm, t) + N(0, noise^2 I).

    The density p(x) = mean over arms of the integral over t of N(x; curve(arm, t), noise^2 I) has
    no closed form; it is evaluated by midpoint quadrature over t with ``quadrature_points`` nodes
    per arm, i.e. as a mixture of that many Gaussians. The nodes are far closer together than the
    noise scale, so the quadrature error is negligible (the tests check the density integrates to 1
    and matches a histogram of samples).
    """

    num_arms = 1

    def __init__(self, noise: float, quadrature_points: int = 2048):
        self.noise = noise
        nodes = (torch.arange(quadrature_points, dtype=torch.float64) + 0.5) / quadrature_points
        self.quadrature_centers = torch.cat([self.curve(arm, nodes) for arm in range(self.num_arms)])

    def curve(self, arm: int, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        arm = torch.randint(0, self.num_arms, (n,), generator=generator)
        t = torch.rand(n, generator=generator, dtype=torch.float64)
        points = torch.zeros(n, 2, dtype=torch.float64)
        for a in range(self.num_arms):
            mask = arm == a
            points[mask] = self.curve(a, t[mask])
        noise = torch.randn(n, 2, generator=generator, dtype=torch.float64)
        return (points + self.noise * noise).float()

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return _isotropic_mixture_log_prob(x, self.quadrature_centers, self.noise)


class TwoMoons(_NoisyCurves):
    """scikit-learn's two interleaving half circles, centred and scaled by 1.5, with noise 0.1."""

    name = "two_moons"
    num_arms = 2

    def __init__(self, noise: float = 0.1, quadrature_points: int = 512):
        super().__init__(noise, quadrature_points)

    def curve(self, arm: int, t: torch.Tensor) -> torch.Tensor:
        angle = math.pi * t
        if arm == 0:
            xy = torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
        else:
            xy = torch.stack([1 - torch.cos(angle), 0.5 - torch.sin(angle)], dim=1)
        return 1.5 * (xy - torch.tensor([0.5, 0.25], dtype=torch.float64))


class Spirals(_NoisyCurves):
    """Two interleaved Archimedean spirals (1.5 turns, radius 0.3 -> 2.7), with noise 0.08."""

    name = "spirals"
    num_arms = 2

    def __init__(self, noise: float = 0.08, quadrature_points: int = 1024):
        super().__init__(noise, quadrature_points)

    def curve(self, arm: int, t: torch.Tensor) -> torch.Tensor:
        angle = 3 * math.pi * t + math.pi * arm
        radius = 0.3 + 2.4 * t
        return torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)


TARGETS_2D = {cls.name: cls for cls in (Checkerboard, EightGaussians, TwoMoons, Spirals)}


def make_target(name: str, **kwargs: Any) -> Target2D:
    if name not in TARGETS_2D:
        raise ValueError(f"unknown 2-D target {name!r}; choose from {sorted(TARGETS_2D)}")
    return TARGETS_2D[name](**kwargs)
