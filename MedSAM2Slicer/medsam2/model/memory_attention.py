"""Memory attention: conditions the current frame's image features on the memory bank.

Each layer is pre-norm: self-attention over the current frame's tokens, cross-attention from those tokens to the
memory (spatial memories of past frames followed by object-pointer tokens), then an MLP. Both attentions use 2D
axial RoPE; the object-pointer tokens have no grid position and are left unrotated.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention
from .rope import AxialRoPE

_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}


class RoPEAttention(Attention):
    """``Attention`` whose queries and keys are rotated by axial RoPE after the head split.

    ``rope_k_repeat`` lets the keys hold several frames' grids (cross-attention to the memory bank).
    Shapes: q ``[B, Nq, C]``, k and v ``[B, Nk, kv_in_dim]`` -> ``[B, Nq, C]``.
    """

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        downsample_rate: int = 1,
        dropout: float = 0.0,
        kv_in_dim: int | None = None,
        rope_theta: float = 10000.0,
        rope_k_repeat: bool = False,
    ) -> None:
        super().__init__(embedding_dim, num_heads, downsample_rate, dropout, kv_in_dim)
        self.rope = AxialRoPE(self.internal_dim // num_heads, theta=rope_theta)
        self.rope_k_repeat = rope_k_repeat

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_k_exclude_rope: int = 0
    ) -> torch.Tensor:
        """``num_k_exclude_rope`` trailing keys (object pointers) are attended to without rotation."""
        q = self._split_heads(self.q_proj(q))
        k = self._split_heads(self.k_proj(k))
        v = self._split_heads(self.v_proj(v))
        q, k = self.rope(q, k, repeat_k=self.rope_k_repeat, num_k_exclude=num_k_exclude_rope)
        return self._attend(q, k, v)


class MemoryAttentionLayer(nn.Module):
    """Pre-norm block: self-attention, cross-attention to the memory, MLP; each added back as a residual.

    Batch-first: ``tgt [B, N, d_model]``, ``memory [B, M, kv_in_dim]`` -> ``[B, N, d_model]``.
    The ``pos_enc_at_*`` flags say where the sine position encodings are added (SAM 2 adds them only to the
    memory keys; RoPE carries the current frame's positions).
    """

    def __init__(
        self,
        *,
        self_attention: RoPEAttention,
        cross_attention: RoPEAttention,
        d_model: int = 256,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: str = "relu",
        pos_enc_at_attn: bool = False,
        pos_enc_at_cross_attn_keys: bool = True,
        pos_enc_at_cross_attn_queries: bool = False,
    ) -> None:
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
        self.self_attn = self_attention
        self.cross_attn_image = cross_attention
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.activation = _ACTIVATIONS[activation]
        self.pos_enc_at_attn = pos_enc_at_attn
        self.pos_enc_at_cross_attn_keys = pos_enc_at_cross_attn_keys
        self.pos_enc_at_cross_attn_queries = pos_enc_at_cross_attn_queries

    def _self_attend(self, tgt: torch.Tensor, query_pos: torch.Tensor) -> torch.Tensor:
        x = self.norm1(tgt)
        qk = x + query_pos if self.pos_enc_at_attn else x
        return tgt + self.dropout(self.self_attn(qk, qk, x))

    def _cross_attend(
        self,
        tgt: torch.Tensor,
        memory: torch.Tensor,
        pos: torch.Tensor,
        query_pos: torch.Tensor,
        num_k_exclude_rope: int,
    ) -> torch.Tensor:
        x = self.norm2(tgt)
        q = x + query_pos if self.pos_enc_at_cross_attn_queries else x
        k = memory + pos if self.pos_enc_at_cross_attn_keys else memory
        return tgt + self.dropout(self.cross_attn_image(q, k, memory, num_k_exclude_rope=num_k_exclude_rope))

    def forward(
        self,
        tgt: torch.Tensor,
        memory: torch.Tensor,
        pos: torch.Tensor,
        query_pos: torch.Tensor,
        num_k_exclude_rope: int = 0,
    ) -> torch.Tensor:
        """``pos`` is the memory's position encoding, ``query_pos`` the current frame's."""
        tgt = self._self_attend(tgt, query_pos)
        tgt = self._cross_attend(tgt, memory, pos, query_pos, num_k_exclude_rope)
        x = self.linear2(self.dropout(self.activation(self.linear1(self.norm3(tgt)))))
        return tgt + self.dropout(x)


class MemoryAttention(nn.Module):
    """``num_layers`` copies of ``layer`` followed by a final LayerNorm.

    Sequence-first in and out, as the tracker stores its tokens: ``curr [HW, B, d_model]`` and
    ``memory [M, B, kv_in_dim]`` -> ``[HW, B, d_model]``, where the last ``num_obj_ptr_tokens`` memory tokens are
    object pointers.
    """

    def __init__(
        self, d_model: int, pos_enc_at_input: bool, layer: MemoryAttentionLayer, num_layers: int
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)
        self.pos_enc_at_input = pos_enc_at_input

    def forward(
        self,
        curr: torch.Tensor,
        memory: torch.Tensor,
        curr_pos: torch.Tensor,
        memory_pos: torch.Tensor,
        num_obj_ptr_tokens: int = 0,
    ) -> torch.Tensor:
        if curr.shape[1] != memory.shape[1]:
            raise ValueError(f"batch sizes differ: current {curr.shape[1]}, memory {memory.shape[1]}")
        if self.pos_enc_at_input:
            # A weak absolute position hint; RoPE inside the attention carries the rest.
            curr = curr + 0.1 * curr_pos
        output, query_pos = curr.transpose(0, 1), curr_pos.transpose(0, 1)
        memory, memory_pos = memory.transpose(0, 1), memory_pos.transpose(0, 1)
        for layer in self.layers:
            output = layer(output, memory, memory_pos, query_pos, num_k_exclude_rope=num_obj_ptr_tokens)
        return self.norm(output).transpose(0, 1)
