"""Seeded orthogonal matrices for rotations: randomized Hadamard where one is constructible.

A Hadamard matrix H of order n (entries +-1, H H^T = n I) exists for n = 1, 2 and many multiples
of 4. Built here: Sylvester (powers of two), Paley I (q + 1 for a prime q = 3 mod 4) and Paley II
(2 (q + 1) for a prime q = 1 mod 4), and Kronecker products of a Paley block with a Sylvester one.
That covers every power of two and e.g. 576 = 16 * 36 (SmolLM2), 896 = 4 * 224, 3072 = 256 * 12.
Other sizes fall back to a seeded random orthogonal matrix (QR of a Gaussian matrix).
"""

from __future__ import annotations

import torch


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    return all(q % d for d in range(2, int(q ** 0.5) + 1))


def _legendre_matrix(q: int) -> torch.Tensor:
    """Jacobsthal matrix Q[i, j] = chi(j - i) of GF(q), chi the quadratic character (q prime)."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0] + [1 if a in squares else -1 for a in range(1, q)], dtype=torch.float64)
    index = (torch.arange(q).view(1, -1) - torch.arange(q).view(-1, 1)) % q
    return chi[index]


def _paley_one(q: int) -> torch.Tensor:
    """Order q + 1 for a prime q = 3 mod 4: H = I + S with S the skew conference matrix."""
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = _legendre_matrix(q)
    return torch.eye(q + 1, dtype=torch.float64) + s


def _paley_two(q: int) -> torch.Tensor:
    """Order 2 (q + 1) for a prime q = 1 mod 4, from the symmetric conference matrix C."""
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = _legendre_matrix(q)
    # Zero entries (the diagonal) become [[1, -1], [-1, -1]], +-1 entries +-[[1, 1], [1, -1]].
    zero_block = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    sign_block = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, sign_block) + torch.kron(torch.eye(q + 1, dtype=torch.float64), zero_block)


def _paley_block(m: int) -> torch.Tensor | None:
    """A Hadamard matrix of order m from Paley I or II, or None."""
    if m == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if m == 2:
        return torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    if _is_prime(m - 1) and (m - 1) % 4 == 3:
        return _paley_one(m - 1)
    if m % 2 == 0 and _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return _paley_two(m // 2 - 1)
    return None


def hadamard_matrix(n: int) -> torch.Tensor | None:
    """A float64 Hadamard matrix of order n (Sylvester x Paley), or None when none is constructed here."""
    if n < 1:
        return None
    power = 1
    while n % (power * 2) == 0:
        power *= 2
    # Try the largest Sylvester factor first: Paley blocks are then as small as possible.
    while power >= 1:
        block = _paley_block(n // power)
        if block is not None:
            sylvester = torch.ones(1, 1, dtype=torch.float64)
            two = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
            p = power
            while p > 1:
                sylvester = torch.kron(sylvester, two)
                p //= 2
            return torch.kron(sylvester, block)
        power //= 2
    return None


def random_orthogonal(n: int, generator: torch.Generator) -> tuple[torch.Tensor, str]:
    """A seeded float64 orthogonal n x n matrix and how it was made.

    `randomized_hadamard`: H diag(random signs) / sqrt(n) (entries all of magnitude 1/sqrt(n), which
    spreads every outlier evenly); `random_orthogonal_qr` where no Hadamard of order n is built.
    """
    hadamard = hadamard_matrix(n)
    if hadamard is not None:
        signs = torch.randint(0, 2, (n,), generator=generator).to(torch.float64) * 2 - 1
        return signs.view(-1, 1) * hadamard / n ** 0.5, "randomized_hadamard"
    gaussian = torch.randn(n, n, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    # Fix the signs so the result is unique given the Gaussian draw (Haar distributed).
    return q * torch.sign(torch.diagonal(r)).view(1, -1), "random_orthogonal_qr"


def fixing_ones(q: torch.Tensor) -> torch.Tensor:
    """`q` times the Householder reflection R that makes it map the all-ones direction u to itself.

    LayerNorm subtracts the mean, i.e. projects out u = 1 / sqrt(n); a rotation of the stream commutes
    with that projection only if Q u = +-u. R swaps u and q^T u, so Q = q R gives Q u = q q^T u = u.
    R changes q by a rank-one term, so Q's entries stay O(1 / sqrt(n)) like q's.
    """
    n = q.shape[0]
    u = torch.full((n,), n ** -0.5, dtype=q.dtype)
    v = u - q.T @ u
    norm2 = v @ v
    if norm2 < 1e-20:  # q already fixes u
        return q
    return q - 2 * torch.outer(q @ v, v) / norm2
