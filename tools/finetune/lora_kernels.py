"""Triton kernels for LoRA dropout: the mask drawn on the fly from ``(seed, element index)``, never stored.

With LoRA dropout p > 0, :mod:`tools.finetune.fused_lora` redraws each layer's mask in the backward instead of
keeping it, so the mask must be a pure function of a seed and the element's flat index. It is:

    group g = index // 8, lane l = index % 8      one Philox draw (``tl.randint4x(seed, g)``: 4 × 32 bits)
                                                  serves the group's 8 elements, 16 bits each
    keep(index) = bits(g, l) ≥ t,   t = round(p · 2¹⁶),   kept values × 2¹⁶ / (2¹⁶ − t)

(p is thus rounded to a multiple of 2⁻¹⁶, and the scale matches the rounded p, so the expectation is exact.)
The first kernel used ``tl.rand(seed, index)``: ten Philox rounds per element made the dropout pass
compute-bound — 76 µs a call on the H200 at the 0.5B shape, three times the memory-bound time.

    dropout            out = [acc +] x ⊙ m · scale            (flat, any contiguous tensor)
    thin_forward       h  = (x ⊙ m · scale) · Aᵀ              (M × r; reads x once)
    thin_grad_a        dA = ghᵀ · (x ⊙ m · scale)             (r × K, fp32; split over M, partial sums added)
    masked_accumulate  dx += (gh · A) ⊙ m · scale             (reads and writes dx once)

The last three (the fused layer's default on a GPU; bench variant ``fast``, against ``fast_flat``) apply the
mask inside the thin adapter matmuls instead of around them; they need K % 8 == 0 (a tile's rows then start
on a group boundary). The rank is padded to a
power of two ≥ 16 inside (``tl.dot``). On CPU they all run under Triton's interpreter (``TRITON_INTERPRET=1``),
which is how the tests check them.
"""

from __future__ import annotations

import os

_KERNELS = None
keep_tile = None        # the shared mask tile, a Triton function made by _build() with the kernels
seed_value = None       # the seed from an argument or from device memory, likewise
dropped_tile = None     # the shared masked-input tile loader, likewise
BLOCK_M, BLOCK_K = 32, 128     # measured best of five tile sizes on the H200 (lora_kernel_bench.py)
SPLIT_M_ROWS = 1024          # rows of M per program in thin_grad_a (its partial sums are added afterwards)
FLAT_GROUPS = 256            # groups of 8 elements per program in the flat dropout kernel


def threshold_and_scale(p: float) -> tuple[int, float]:
    """The 16-bit keep threshold for dropout ``p`` and the scale of kept values (matching the rounded p)."""
    threshold = min(65535, max(0, round(p * 65536)))
    return threshold, 65536.0 / (65536 - threshold)


def _build():
    import triton
    import triton.language as tl

    global keep_tile, dropped_tile, seed_value     # a kernel finds the functions it calls among its module's globals

    @triton.jit
    def keep_tile(seed, groups, threshold, ROWS: tl.constexpr, COLS: tl.constexpr):
        """The (ROWS × COLS) keep-mask of the elements of ``groups`` (ROWS × COLS/8 group numbers, 8 elements
        each, in order): one Philox draw per group, cut into eight 16-bit numbers."""
        r0, r1, r2, r3 = tl.randint4x(seed, groups)
        lane = tl.arange(0, 8)[None, None, :]
        word = tl.where(lane < 4, tl.where(lane < 2, r0[:, :, None], r1[:, :, None]),
                        tl.where(lane < 6, r2[:, :, None], r3[:, :, None]))
        bits = (word >> ((lane & 1) * 16)) & 0xFFFF
        return tl.reshape(bits >= threshold, (ROWS, COLS))

    @triton.jit
    def seed_value(seed_ptr, seed, SEED_PTR: tl.constexpr):
        """The Philox seed: ``seed`` itself, or with SEED_PTR the counter at ``seed_ptr`` (read on the device, so
        a CUDA graph replays a new mask each time the counter moves) plus ``seed`` as the layer's offset."""
        if SEED_PTR:
            return tl.load(seed_ptr) + seed
        else:
            return seed

    @triton.jit
    def dropped_tile(x_ptr, rows, k0, M, K, threshold, scale, seed, BLOCK_M: tl.constexpr,
                     BLOCK_K: tl.constexpr):
        """The (BLOCK_M × BLOCK_K) tile at (rows, k0…) of the (M × K) input with the mask of ``seed`` applied."""
        cols = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None] * K + cols[None, :], mask=(rows[:, None] < M) & (cols[None, :] < K),
                    other=0.0)
        groups = rows[:, None] * (K // 8) + (k0 // 8 + tl.arange(0, BLOCK_K // 8))[None, :]
        keep = keep_tile(seed, groups, threshold, BLOCK_M, BLOCK_K)
        return tl.where(keep, x * scale, 0.0)

    @triton.jit(do_not_specialize=["seed"])     # one compiled kernel for every seed
    def dropout(x_ptr, acc_ptr, out_ptr, n, threshold, scale, seed_ptr, seed, ACCUMULATE: tl.constexpr,
                GROUPS: tl.constexpr, SEED_PTR: tl.constexpr):
        seed = seed_value(seed_ptr, seed, SEED_PTR)
        groups = tl.program_id(0) * GROUPS + tl.arange(0, GROUPS)
        offsets = groups[:, None] * 8 + tl.arange(0, 8)[None, :]
        inside = offsets < n
        x = tl.load(x_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        y = tl.where(keep_tile(seed, groups[:, None], threshold, GROUPS, 8), x * scale, 0.0)
        if ACCUMULATE:
            y += tl.load(acc_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        tl.store(out_ptr + offsets, y.to(out_ptr.dtype.element_ty), mask=inside)

    @triton.jit(do_not_specialize=["seed"])
    def thin_forward(x_ptr, a_ptr, h_ptr, M, K, R, threshold, scale, seed_ptr, seed,
                     BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, SEED_PTR: tl.constexpr):
        seed = seed_value(seed_ptr, seed, SEED_PTR)
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        ranks = tl.arange(0, BLOCK_R)
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = dropped_tile(x_ptr, rows, k0, M, K, threshold, scale, seed, BLOCK_M, BLOCK_K)
            cols = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(a_ptr + ranks[None, :] * K + cols[:, None],            # Aᵀ tile: (BLOCK_K, BLOCK_R)
                        mask=(cols[:, None] < K) & (ranks[None, :] < R), other=0.0)
            acc += tl.dot(x.to(x_ptr.dtype.element_ty), a.to(x_ptr.dtype.element_ty))   # A may be fp32
        tl.store(h_ptr + rows[:, None] * R + ranks[None, :], acc.to(h_ptr.dtype.element_ty),
                 mask=(rows[:, None] < M) & (ranks[None, :] < R))

    @triton.jit(do_not_specialize=["seed"])
    def thin_grad_a(x_ptr, gh_ptr, out_ptr, M, K, R, threshold, scale, seed_ptr, seed, ROWS: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, SEED_PTR: tl.constexpr):
        seed = seed_value(seed_ptr, seed, SEED_PTR)
        k0 = tl.program_id(0) * BLOCK_K
        cols = k0 + tl.arange(0, BLOCK_K)
        split = tl.program_id(1)
        ranks = tl.arange(0, BLOCK_R)
        acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
        for m0 in range(split * ROWS, split * ROWS + ROWS, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            x = dropped_tile(x_ptr, rows, k0, M, K, threshold, scale, seed, BLOCK_M, BLOCK_K)
            gh_t = tl.load(gh_ptr + rows[None, :] * R + ranks[:, None],          # ghᵀ tile: (BLOCK_R, BLOCK_M)
                           mask=(rows[None, :] < M) & (ranks[:, None] < R), other=0.0)
            acc += tl.dot(gh_t, x.to(gh_t.dtype))
        tl.store(out_ptr + split * R * K + ranks[:, None] * K + cols[None, :], acc,
                 mask=(ranks[:, None] < R) & (cols[None, :] < K))

    @triton.jit(do_not_specialize=["seed"])
    def masked_accumulate(dx_ptr, gh_ptr, a_ptr, M, K, R, threshold, scale, seed_ptr, seed,
                          BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                          SEED_PTR: tl.constexpr):
        seed = seed_value(seed_ptr, seed, SEED_PTR)
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        k0 = tl.program_id(1) * BLOCK_K
        cols = k0 + tl.arange(0, BLOCK_K)
        ranks = tl.arange(0, BLOCK_R)
        gh = tl.load(gh_ptr + rows[:, None] * R + ranks[None, :], mask=(rows[:, None] < M) & (ranks[None, :] < R),
                     other=0.0)
        a = tl.load(a_ptr + ranks[:, None] * K + cols[None, :], mask=(ranks[:, None] < R) & (cols[None, :] < K),
                    other=0.0)
        y = tl.dot(gh, a.to(gh.dtype))                                           # A may be fp32
        groups = rows[:, None] * (K // 8) + (k0 // 8 + tl.arange(0, BLOCK_K // 8))[None, :]
        y = tl.where(keep_tile(seed, groups, threshold, BLOCK_M, BLOCK_K), y * scale, 0.0)
        inside = (rows[:, None] < M) & (cols[None, :] < K)
        index = rows[:, None] * K + cols[None, :]
        dx = tl.load(dx_ptr + index, mask=inside, other=0.0).to(tl.float32)
        tl.store(dx_ptr + index, (dx + y).to(dx_ptr.dtype.element_ty), mask=inside)

    return dropout, thin_forward, thin_grad_a, masked_accumulate


def kernels():
    """The compiled kernels (dropout, thin_forward, thin_grad_a, masked_accumulate), or ``None`` where Triton
    is not available."""
    global _KERNELS
    if _KERNELS is None:
        try:
            _KERNELS = _build()
        except Exception:  # noqa: BLE001 - no Triton: fused_lora keeps its PyTorch path
            _KERNELS = False
    return _KERNELS or None


def _on_device(tensor) -> bool:
    """A GPU tensor, or any under Triton's interpreter (the tests on CPU)."""
    return tensor.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def dropout_usable(rows, accumulate=None) -> bool:
    """Whether the flat kernel can take ``rows`` (and ``accumulate``): flat indices within int32, on a device."""
    return (_on_device(rows) and rows.numel() < 2**31 and (accumulate is None or accumulate.is_contiguous())
            and kernels() is not None)


def usable(rows, rank: int) -> bool:
    """Whether the thin-matmul kernels can take a (M × K) input at this LoRA rank: flat indices within int32,
    K a multiple of 8 (groups do not straddle rows), on a device."""
    return (_on_device(rows) and rows.numel() < 2**31 and rows.shape[-1] % 8 == 0 and 1 <= rank <= 128
            and kernels() is not None)


def _block_r(rank: int) -> int:
    return max(16, 1 << (rank - 1).bit_length())


def _seed_args(seed, like) -> dict:
    """A kernel's seed arguments: an ``int`` is the seed itself; a ``(counter, offset)`` pair (an int64 tensor
    on the device and an int) is read by the kernel as ``counter + offset`` when it runs (CUDA graphs)."""
    if isinstance(seed, tuple):
        return {"seed_ptr": seed[0], "seed": seed[1], "SEED_PTR": True}
    return {"seed_ptr": like, "seed": seed, "SEED_PTR": False}


def dropout(rows, p: float, seed, accumulate=None):
    """``rows ⊙ mask · scale`` (a new tensor), or with ``accumulate`` that plus it, written into ``accumulate``."""
    kernel = kernels()[0]
    rows = rows.contiguous()
    out = accumulate if accumulate is not None else rows.new_empty(rows.shape)
    threshold, scale = threshold_and_scale(p)
    grid = ((rows.numel() + 8 * FLAT_GROUPS - 1) // (8 * FLAT_GROUPS),)
    kernel[grid](rows, out, out, rows.numel(), threshold, scale, **_seed_args(seed, rows),
                 ACCUMULATE=accumulate is not None, GROUPS=FLAT_GROUPS)
    return out


def thin_forward(rows, a, p: float, seed):
    """``(rows ⊙ mask · scale) @ aᵀ`` — rows (M, K), a (R, K; fp32 or rows' dtype), both contiguous."""
    forward = kernels()[1]
    m, k = rows.shape
    r = a.shape[0]
    h = rows.new_empty((m, r))
    forward[((m + BLOCK_M - 1) // BLOCK_M,)](rows, a, h, m, k, r, *threshold_and_scale(p), **_seed_args(seed, rows),
                                              BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, BLOCK_R=_block_r(r))
    return h


def thin_grad_a(rows, gh, p: float, seed, factor: float = 1.0):
    """``factor · ghᵀ @ (rows ⊙ mask · scale)`` in fp32 — rows (M, K), gh (M, R), both contiguous, same dtype."""
    import torch

    grad_a = kernels()[2]
    m, k = rows.shape
    r = gh.shape[1]
    splits = (m + SPLIT_M_ROWS - 1) // SPLIT_M_ROWS
    partial = torch.empty((splits, r, k), dtype=torch.float32, device=rows.device)
    threshold, scale = threshold_and_scale(p)
    grad_a[((k + BLOCK_K - 1) // BLOCK_K, splits)](rows, gh, partial, m, k, r, threshold, scale * factor,
                                                   **_seed_args(seed, rows),
                                                   ROWS=SPLIT_M_ROWS, BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K,
                                                   BLOCK_R=_block_r(r))
    return partial.sum(dim=0)


def masked_accumulate(dx, gh, a, p: float, seed, factor: float = 1.0):
    """``dx += factor · (gh @ a) ⊙ mask · scale`` in place — dx (M, K), gh (M, R), a (R, K; fp32 or gh's dtype),
    contiguous."""
    accumulate = kernels()[3]
    m, k = dx.shape
    r = gh.shape[1]
    grid = ((m + BLOCK_M - 1) // BLOCK_M, (k + BLOCK_K - 1) // BLOCK_K)
    threshold, scale = threshold_and_scale(p)
    accumulate[grid](dx, gh, a, m, k, r, threshold, scale * factor, **_seed_args(seed, dx), BLOCK_M=BLOCK_M,
                     BLOCK_K=BLOCK_K, BLOCK_R=_block_r(r))
    return dx
