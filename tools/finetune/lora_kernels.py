"""Triton kernels for the LoRA path with dropout: the thin adapter matmuls with the dropout mask applied inside.

With LoRA dropout p > 0, :mod:`tools.finetune.fused_lora` draws the mask from ``(seed, element index)`` and,
with PyTorch ops around one dropout kernel, makes three passes over a full-width (tokens × features) tensor per
adapted layer and step: it writes the dropped-out input for ``h = x̃ · Aᵀ``, writes it again for A's gradient
``x̃ᵀ``-product, and writes ``gh · A`` before adding its masked share to the input gradient. Here each of the
three is one kernel that reads the full-width tensor once and draws the same mask on the fly:

    thin_forward    h  = (x ⊙ m / (1 - p)) · Aᵀ             (M × r; reads x once)
    thin_grad_a     dA = ghᵀ · (x ⊙ m / (1 - p))            (r × K, fp32; split over M, partial sums added)
    masked_accumulate  dx += (gh · A) ⊙ m / (1 - p)          (reads and writes dx once)

``m[i, j] = rand(seed, i · K + j) ≥ p`` — the same mask as ``fused_lora._dropped``'s flat kernel. The rank is
padded to a power of two ≥ 16 inside (``tl.dot``). Opt-in (``fused_lora.enable(..., kernels=True)``, bench
variant ``fast_kernels``) until measured; on CPU they run under Triton's interpreter (``TRITON_INTERPRET=1``),
which is how the tests check them.
"""

from __future__ import annotations

_KERNELS = None
dropped_tile = None     # the shared tile loader, a Triton function made by _build() with the kernels
BLOCK_M, BLOCK_K = 64, 64
SPLIT_M_ROWS = 1024          # rows of M per program in thin_grad_a (its partial sums are added afterwards)


def _build():
    import triton
    import triton.language as tl

    global dropped_tile     # a kernel finds the functions it calls among its module's globals

    @triton.jit
    def dropped_tile(x_ptr, rows, cols, M, K, p, scale, seed):
        """The (rows × cols) tile of the (M × K) input with the dropout mask of ``seed`` applied."""
        index = rows[:, None] * K + cols[None, :]
        x = tl.load(x_ptr + index, mask=(rows[:, None] < M) & (cols[None, :] < K), other=0.0)
        return tl.where(tl.rand(seed, index) >= p, x * scale, 0.0).to(x_ptr.dtype.element_ty)

    @triton.jit(do_not_specialize=["seed"])
    def thin_forward(x_ptr, a_ptr, h_ptr, M, K, R, p, scale, seed,
                     BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        ranks = tl.arange(0, BLOCK_R)
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            x = dropped_tile(x_ptr, rows, cols, M, K, p, scale, seed)
            a = tl.load(a_ptr + ranks[None, :] * K + cols[:, None],            # Aᵀ tile: (BLOCK_K, BLOCK_R)
                        mask=(cols[:, None] < K) & (ranks[None, :] < R), other=0.0)
            acc += tl.dot(x, a)
        tl.store(h_ptr + rows[:, None] * R + ranks[None, :], acc.to(h_ptr.dtype.element_ty),
                 mask=(rows[:, None] < M) & (ranks[None, :] < R))

    @triton.jit(do_not_specialize=["seed"])
    def thin_grad_a(x_ptr, gh_ptr, out_ptr, M, K, R, p, scale, seed, ROWS: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
        cols = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
        split = tl.program_id(1)
        ranks = tl.arange(0, BLOCK_R)
        acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
        for m0 in range(split * ROWS, split * ROWS + ROWS, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            x = dropped_tile(x_ptr, rows, cols, M, K, p, scale, seed)
            gh_t = tl.load(gh_ptr + rows[None, :] * R + ranks[:, None],          # ghᵀ tile: (BLOCK_R, BLOCK_M)
                           mask=(rows[None, :] < M) & (ranks[:, None] < R), other=0.0)
            acc += tl.dot(gh_t, x)
        tl.store(out_ptr + split * R * K + ranks[:, None] * K + cols[None, :], acc,
                 mask=(ranks[:, None] < R) & (cols[None, :] < K))

    @triton.jit(do_not_specialize=["seed"])
    def masked_accumulate(dx_ptr, gh_ptr, a_ptr, M, K, R, p, scale, seed,
                          BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        ranks = tl.arange(0, BLOCK_R)
        gh = tl.load(gh_ptr + rows[:, None] * R + ranks[None, :], mask=(rows[:, None] < M) & (ranks[None, :] < R),
                     other=0.0)
        a = tl.load(a_ptr + ranks[:, None] * K + cols[None, :], mask=(ranks[:, None] < R) & (cols[None, :] < K),
                    other=0.0)
        y = tl.dot(gh, a)
        inside = (rows[:, None] < M) & (cols[None, :] < K)
        index = rows[:, None] * K + cols[None, :]
        y = tl.where(tl.rand(seed, index) >= p, y * scale, 0.0)
        dx = tl.load(dx_ptr + index, mask=inside, other=0.0).to(tl.float32)
        tl.store(dx_ptr + index, (dx + y).to(dx_ptr.dtype.element_ty), mask=inside)

    return thin_forward, thin_grad_a, masked_accumulate


def kernels():
    """The three compiled kernels, or ``None`` where Triton is not available."""
    global _KERNELS
    if _KERNELS is None:
        try:
            _KERNELS = _build()
        except Exception:  # noqa: BLE001 - no Triton: fused_lora keeps its PyTorch path
            _KERNELS = False
    return _KERNELS or None


def usable(rows, rank: int) -> bool:
    """Whether these kernels can take a (M × K) input at this LoRA rank (flat indices within int32), on its
    device (a GPU, or the CPU under Triton's interpreter)."""
    import os

    on_device = rows.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    return on_device and rows.numel() < 2**31 and 1 <= rank <= 128 and kernels() is not None


def _block_r(rank: int) -> int:
    return max(16, 1 << (rank - 1).bit_length())


def thin_forward(rows, a, p: float, seed: int):
    """``(rows ⊙ mask / (1 - p)) @ aᵀ`` — rows (M, K) contiguous, a (R, K) contiguous, same dtype."""
    forward, _, _ = kernels()
    m, k = rows.shape
    r = a.shape[0]
    h = rows.new_empty((m, r))
    forward[((m + BLOCK_M - 1) // BLOCK_M,)](rows, a, h, m, k, r, p, 1.0 / (1.0 - p), seed,
                                              BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, BLOCK_R=_block_r(r))
    return h


def thin_grad_a(rows, gh, p: float, seed: int):
    """``ghᵀ @ (rows ⊙ mask / (1 - p))`` in fp32 — rows (M, K), gh (M, R), both contiguous, same dtype."""
    import torch

    _, grad_a, _ = kernels()
    m, k = rows.shape
    r = gh.shape[1]
    splits = (m + SPLIT_M_ROWS - 1) // SPLIT_M_ROWS
    partial = torch.empty((splits, r, k), dtype=torch.float32, device=rows.device)
    grad_a[((k + BLOCK_K - 1) // BLOCK_K, splits)](rows, gh, partial, m, k, r, p, 1.0 / (1.0 - p), seed,
                                                   ROWS=SPLIT_M_ROWS, BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K,
                                                   BLOCK_R=_block_r(r))
    return partial.sum(dim=0)


def masked_accumulate(dx, gh, a, p: float, seed: int):
    """``dx += (gh @ a) ⊙ mask / (1 - p)`` in place — dx (M, K), gh (M, R), a (R, K), contiguous."""
    _, _, accumulate = kernels()
    m, k = dx.shape
    r = gh.shape[1]
    grid = ((m + BLOCK_M - 1) // BLOCK_M, (k + BLOCK_K - 1) // BLOCK_K)
    accumulate[grid](dx, gh, a, m, k, r, p, 1.0 / (1.0 - p), seed, BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K,
                     BLOCK_R=_block_r(r))
    return dx
