"""2D axial rotary position encoding (RoPE) for the square token grids of the memory attention.

Each head's channels are taken as consecutive pairs ``(2i, 2i + 1)``, and each pair is rotated by an angle
proportional to the token's position: the first half of the pairs by its column (x), the second half by its row
(y), with frequencies ``theta ** (-4j / head_dim)``. Because rotations compose, the dot product of a rotated
query and a rotated key depends only on their relative offset on the grid.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def axial_rope_angles(head_dim: int, side: int, theta: float = 10000.0) -> torch.Tensor:
    """Rotation angles ``[side * side, head_dim / 2]`` (float32) of a ``side x side`` grid in row-major order.

    ``head_dim`` must be divisible by 4 (x and y each take half of the channel pairs).
    """
    num_freqs = head_dim // 4
    freqs = 1.0 / theta ** (torch.arange(num_freqs, dtype=torch.float32) * 4 / head_dim)
    index = torch.arange(side * side, dtype=torch.float32)
    cols = index % side
    rows = torch.div(index, side, rounding_mode="floor")
    return torch.cat((torch.outer(cols, freqs), torch.outer(rows, freqs)), dim=1)


def rotate_pairs(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Rotate the channel pairs of ``x [..., N, D]`` by per-token unit complex numbers ``rotations [N, D / 2]``.

    Each pair is read as one complex number, so a rotation is a single complex multiply. Computed in at least
    float32 (half-precision rotations would blur far-apart positions) and returned in ``x``'s dtype.
    """
    pairs = torch.view_as_complex(x.to(torch.promote_types(x.dtype, torch.float32)).unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * rotations).flatten(-2).to(x.dtype)


class AxialRoPE(nn.Module):
    """Applies axial RoPE to queries and keys of one attention call; has no parameters.

    The grid is inferred at run time from the query count (it must be a square number), and its rotations are cached
    per (grid side, device). Keys may hold several frames' grids back to back (``repeat_k``), each rotated like the
    queries, followed by ``num_k_exclude`` tokens that carry no grid position (object pointers) and stay as they are.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"axial RoPE needs a head width divisible by 4, got {head_dim}")
        self.head_dim = head_dim
        self.theta = theta
        self._cache: dict[tuple[int, torch.device], torch.Tensor] = {}

    def _rotations(self, num_tokens: int, device: torch.device) -> torch.Tensor:
        """Unit complex numbers ``[num_tokens, head_dim / 2]`` of the square grid with that many tokens."""
        side = math.isqrt(num_tokens)
        if side * side != num_tokens:
            raise ValueError(f"RoPE needs a square token grid, got {num_tokens} query tokens")
        key = (side, device)
        if key not in self._cache:
            # Built as normal tensors even under inference_mode, so a cache filled during inference still
            # serves a later training step.
            with torch.inference_mode(False), torch.no_grad():
                angles = axial_rope_angles(self.head_dim, side, self.theta)
                self._cache[key] = torch.polar(torch.ones_like(angles), angles).to(device)
        return self._cache[key]

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, repeat_k: bool = False, num_k_exclude: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``q [B, heads, Nq, D]``, ``k [B, heads, Nk, D]`` -> both rotated, same shapes.

        The first ``Nk - num_k_exclude`` keys must be ``Nq`` tokens, or with ``repeat_k`` a whole number of
        ``Nq``-token frames.
        """
        num_q = q.shape[-2]
        rotations = self._rotations(num_q, q.device)
        q = rotate_pairs(q, rotations)

        num_k_rope = k.shape[-2] - num_k_exclude
        if num_k_rope < 0:
            raise ValueError(f"cannot exclude {num_k_exclude} of {k.shape[-2]} keys from RoPE")
        if num_k_rope == 0:
            return q, k
        num_frames, leftover = divmod(num_k_rope, num_q)
        if leftover or (num_frames != 1 and not repeat_k):
            raise ValueError(
                f"{num_k_rope} position-encoded keys do not match {num_q} queries"
                + ("" if repeat_k else " (keys from several frames need repeat_k)")
            )
        # Views the keys as [..., frames, Nq, D] so one grid's angles broadcast over all frames.
        grid_keys = k[..., :num_k_rope, :].unflatten(-2, (num_frames, num_q))
        rotated = rotate_pairs(grid_keys, rotations).flatten(-3, -2)
        if num_k_exclude == 0:
            return q, rotated
        return q, torch.cat((rotated, k[..., num_k_rope:, :]), dim=-2)
