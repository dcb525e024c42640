"""Decode attention of one query token over the resident KV store.

Ops (namespace ``lsa``):
- ``sparse_decode_attention``: attention over the chunks listed in a sequence's slot table. Each slot
  ``i`` of sequence ``b`` holds logical chunk ``slot_chunk[b, i]`` (-1: empty); its tokens sit at
  positions ``chunk * C + j``. A token takes part when its slot is filled, its position is at most
  ``pos`` (the token being decoded, already appended) and at least ``valid_start[b]`` (left padding).
  GQA-aware: query head ``h`` reads kv head ``h // (Hq // Hkv)``, as repeat_kv and ``enable_gqa`` do.
- ``sparse_decode_attention_append``: a sparse layer's whole decode step, what the rewrite emits:
  ``append_kv`` of the token at ``pos``, ``update_chunk_index`` of its key, ``tap`` of the query into
  ``q_tap``, then ``sparse_decode_attention``. On CUDA it is the attention's two launches and no more:
  the split programs read the pool strictly below ``pos``, and the merge adds the token itself as one
  more partial (``q . k_new``, ``v_new``) and writes it into its pool slot, its chunk's bounds and the
  tap, while the split kernel still runs (no launch of its own; nothing in the launch reads what it
  writes).
- ``ring_decode_attention``: exact attention over a sliding-window layer's ring of ``W`` tokens.

Scores are computed in float32; optional tanh soft-capping (``softcap > 0``) matches Gemma-2 style
``tanh(s / cap) * cap``. The result has the query's dtype.

Shapes: ``q`` ``[B, Hq, D]``; pool ``[B * S, C, Hkv, D]``; ``slot_chunk`` ``[B, S]`` int64;
``pos`` ``[1]`` int64; ``valid_start`` ``[B]`` int64; ring ``[B, W, Hkv, D]``; output ``[B, Hq, D]``.

Triton (CUDA tensors): split-K flash decoding. One program serves one kv head and its whole query
group (GQA: K/V are read once per kv head), over a contiguous range of slots (ring: of ``BLOCK_N``-token
blocks), with an fp32 online softmax; a second kernel merges the splits (any number of them), launched
as a programmatic dependent launch on sm90+ so its launch overlaps the first's last programs. On
sm90 a 16-bit query group of 32+ heads is padded to 64 rows where every split program has an SM to
itself (batch-1 MQA), so its dots run as wgmma. Supported there: q and K/V of
one dtype among fp16/bf16/fp32, head_dim and chunk size powers of two (16..256 and 16..128). Anything
else on CUDA runs the reference (with a one-time warning); CPU tensors always run the reference.
Where no position takes part at all, the kernels return zeros (the reference returns NaN).

The launchers take each launch choice as a keyword argument (split count, tokens per block, query-group
rows, warps, stages, PDL; default: the heuristics below), for benchmarks; the ops use the defaults.

Per call on CUDA (either sparse op): two launches, no host sync (``pos`` and ``valid_start`` are read on the device), a
grid fixed by shapes alone (so CUDA graphs replay it), one allocation (the output, which a custom op
must return fresh; a graph replay reuses its address), and a float32 workspace of split partials
cached per shape and device, shared by every layer of that shape: safe in stream order, not across
concurrent streams.

Not here: prefill attention (the model's own), choosing the resident chunks (the memory manager).
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton ships for Linux only; every op then runs its reference.
    triton = None

from .append_kv import _check_append, _check_bounds, append_kv_ref, update_chunk_index_ref


def _attend(q: Tensor, k: Tensor, v: Tensor, valid: Tensor, *, scale: float, softcap: float) -> Tensor:
    """Masked softmax attention. q [B, Hq, D], k/v [B, N, Hkv, D], valid [B, N] -> [B, Hq, D]."""
    batch, q_heads, head_dim = q.shape
    kv_heads = k.shape[2]
    group = q_heads // kv_heads
    qf = q.float().view(batch, kv_heads, group, head_dim)
    scores = torch.einsum("bhgd,bnhd->bhgn", qf, k.float()) * scale  # [B, Hkv, G, N]
    if softcap > 0.0:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    # Masked entries get probability 0, but 0 * NaN is NaN: clear them so stale slots cannot leak.
    v = v.float().masked_fill(~valid[:, :, None, None], 0.0)
    out = torch.einsum("bhgn,bnhd->bhgd", probs, v)  # [B, Hkv, G, D]
    return out.reshape(batch, q_heads, head_dim).to(q.dtype)


def sparse_decode_attention_ref(
    q: Tensor,
    k_pool: Tensor,
    v_pool: Tensor,
    slot_chunk: Tensor,
    pos: Tensor,
    valid_start: Tensor,
    *,
    scale: float,
    softcap: float = 0.0,
) -> Tensor:
    """Reference for ``lsa::sparse_decode_attention`` (pure PyTorch)."""
    batch = q.shape[0]
    slots = slot_chunk.shape[1]
    chunk, kv_heads, head_dim = k_pool.shape[1:]
    k = k_pool.view(batch, slots * chunk, kv_heads, head_dim)
    v = v_pool.view(batch, slots * chunk, kv_heads, head_dim)
    offs = torch.arange(chunk, device=q.device)
    positions = (slot_chunk.unsqueeze(-1) * chunk + offs).view(batch, slots * chunk)  # [B, S*C]
    filled = (slot_chunk >= 0).unsqueeze(-1).expand(batch, slots, chunk).reshape(batch, slots * chunk)
    valid = filled & (positions <= pos) & (positions >= valid_start.unsqueeze(1))
    return _attend(q, k, v, valid, scale=scale, softcap=softcap)


def sparse_decode_attention_append_ref(
    q: Tensor,
    k_pool: Tensor,
    v_pool: Tensor,
    slot_chunk: Tensor,
    pos: Tensor,
    valid_start: Tensor,
    k_new: Tensor,
    v_new: Tensor,
    chunk_slot: Tensor,
    kmin: Tensor,
    kmax: Tensor,
    q_tap: Tensor,
    *,
    scale: float,
    softcap: float = 0.0,
) -> Tensor:
    """Reference for ``lsa::sparse_decode_attention_append`` (pure PyTorch): ``append_kv_ref``,
    ``update_chunk_index_ref`` (chunk size: the pool's), the query tap, then ``sparse_decode_attention_ref``."""
    append_kv_ref(k_pool, v_pool, k_new, v_new, pos, chunk_slot)
    update_chunk_index_ref(kmin, kmax, k_new, pos, k_pool.shape[1])
    q_tap.copy_(q.reshape(q_tap.shape))
    return sparse_decode_attention_ref(q, k_pool, v_pool, slot_chunk, pos, valid_start, scale=scale, softcap=softcap)


def ring_decode_attention_ref(
    q: Tensor, k_ring: Tensor, v_ring: Tensor, pos: Tensor, valid_start: Tensor, *, scale: float, softcap: float = 0.0
) -> Tensor:
    """Reference for ``lsa::ring_decode_attention``: ring slot i holds the latest position = i mod W."""
    window = k_ring.shape[1]
    slot = torch.arange(window, device=q.device)
    positions = pos - torch.remainder(pos - slot, window)  # [W]
    valid = (positions >= 0).unsqueeze(0) & (positions.unsqueeze(0) >= valid_start.unsqueeze(1))  # [B, W]
    return _attend(q, k_ring, v_ring, valid, scale=scale, softcap=softcap)


# -- Triton kernels ------------------------------------------------------------------------------

if triton is not None:
    _LOG2E = tl.constexpr(1.4426950408889634)
    # Finite floor for the running max: a split that attends to nothing keeps exp2(m_i - m_new) = 1
    # instead of exp2(-inf - -inf) = NaN, and its weight in the merge is exp2(-1e30 - M) = 0.
    _MAX_FLOOR = tl.constexpr(-1.0e30)

    @triton.jit
    def _decode_split_kernel(
        q_ptr, k_ptr, v_ptr, table_ptr, pos_ptr, valid_start_ptr, ws_o_ptr, ws_ml_ptr,
        num_blocks, blocks_per_split, group, window, scale, softcap,
        stride_q_b, stride_q_h, stride_q_d,
        stride_k_b, stride_k_slot, stride_k_n, stride_k_h, stride_k_d,
        stride_v_b, stride_v_slot, stride_v_n, stride_v_h, stride_v_d,
        stride_table_b, stride_table_s,
        stride_wo_b, stride_wo_h, stride_wo_s,
        stride_wml_b, stride_wml_h, stride_wml_s,
        IS_RING: tl.constexpr,
        USE_SOFTCAP: tl.constexpr,
        CHUNK: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_G: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        USE_PDL: tl.constexpr,
        BEFORE_POS: tl.constexpr,
    ):
        """One (sequence, kv head, split): partial attention of the kv head's query group.

        Blocks of ``BLOCK_N`` tokens are the unit of work: a chunk of the pool is ``CHUNK // BLOCK_N``
        blocks (one, unless the tile would not fit), or a block spans ``BLOCK_N // CHUNK`` slots
        (chunks shorter than ``min_block_tokens``; ``window`` then holds the slots per sequence);
        the ring (``window`` tokens) is ``cdiv(W, BLOCK_N)`` blocks. Writes,
        per query head of the group, the unnormalised accumulator to ``ws_o`` ``[B, Hq, splits,
        HEAD_DIM]`` and the running max (log2 domain) and sum of exponentials to ``ws_ml``
        ``[B, Hq, splits, 2]``. With ``USE_PDL`` it lets the merge kernel launch once its K/V loop is
        done (that kernel waits for this grid's results before reading). With ``BEFORE_POS`` (pool
        only) the positions strictly below ``pos`` take part: the merge adds the token at ``pos``.
        """
        tl.static_assert(BLOCK_G >= 16, "tl.dot needs at least 16 rows: pad the query group")
        tl.static_assert(BLOCK_N >= 16)
        tl.static_assert(HEAD_DIM >= 16)
        tl.static_assert(CHUNK % BLOCK_N == 0 or (BLOCK_N % CHUNK == 0 and not IS_RING))
        SUBS: tl.constexpr = max(CHUNK // BLOCK_N, 1)  # blocks per chunk
        SPAN: tl.constexpr = max(BLOCK_N // CHUNK, 1)  # slots per block

        pid_b = tl.program_id(0).to(tl.int64)
        pid_kv = tl.program_id(1).to(tl.int64)
        pid_s = tl.program_id(2)

        offs_g = tl.arange(0, BLOCK_G)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        mask_g = offs_g < group
        heads = pid_kv * group + offs_g  # int64 query-head ids of the group

        q_ptrs = q_ptr + pid_b * stride_q_b + heads[:, None] * stride_q_h + offs_d[None, :] * stride_q_d
        q = tl.load(q_ptrs, mask=mask_g[:, None], other=0.0)  # [BLOCK_G, HEAD_DIM]; padded rows are 0

        pos = tl.load(pos_ptr)
        # the last position read from the pool: ``pos`` itself, or (``BEFORE_POS``) the one before it,
        # whose slot row the merge kernel writes in this same step
        last = pos
        if BEFORE_POS:
            last = pos - 1
        valid_start = tl.load(valid_start_ptr + pid_b)
        k_base = k_ptr + pid_b * stride_k_b + pid_kv * stride_k_h + offs_d[None, :] * stride_k_d
        v_base = v_ptr + pid_b * stride_v_b + pid_kv * stride_v_h + offs_d[None, :] * stride_v_d

        if IS_RING:
            # slot i holds pos - ((pos - i) mod W) = ring_base + i - (W if i > pos mod W else 0): one
            # int64 modulo per program instead of one per token
            ring_head = pos % window
            ring_base = pos - ring_head

        m_i = tl.full([BLOCK_G], _MAX_FLOOR, tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)

        blk_start = pid_s.to(tl.int64) * blocks_per_split  # int64 bounds: an int64 induction variable
        blk_end = tl.minimum(blk_start + blocks_per_split, num_blocks)
        for blk in range(blk_start, blk_end):
            if IS_RING:
                token = blk * BLOCK_N + offs_n
                position = ring_base + token - tl.where(token > ring_head, window, 0)
                mask_n = (token < window) & (position >= 0) & (position >= valid_start)
                k_offs = token * stride_k_n
                v_offs = token * stride_v_n
            else:
                if SPAN > 1:
                    # a block spans SPAN consecutive slots (``window`` holds the slot count here)
                    slot = blk * SPAN + offs_n // CHUNK
                    token = offs_n % CHUNK
                    chunk = tl.load(table_ptr + pid_b * stride_table_b + slot * stride_table_s, mask=slot < window, other=-1)
                    position = chunk * CHUNK + token
                    # an empty slot (chunk -1) has only negative positions: position >= 0 tests fill
                    mask_n = (position >= 0) & (position <= last) & (position >= valid_start)
                else:
                    slot = blk // SUBS
                    first = (blk % SUBS) * BLOCK_N
                    chunk = tl.load(table_ptr + pid_b * stride_table_b + slot * stride_table_s)
                    # the block's valid tokens are one run [lo, hi] of offsets: per-block scalar bounds,
                    # then two int32 compares per token (an empty slot, chunk -1, gets hi = -1); three
                    # int64 position compares per token cost ~30 more instructions per block (run 23)
                    base = chunk * CHUNK + first
                    lo = tl.minimum(tl.maximum(valid_start - base, 0), BLOCK_N).to(tl.int32)
                    hi = tl.where(chunk >= 0, tl.minimum(tl.maximum(last - base, -1), BLOCK_N), -1).to(tl.int32)
                    mask_n = (offs_n >= lo) & (offs_n <= hi)
                    token = first + offs_n
                k_offs = slot * stride_k_slot + token * stride_k_n
                v_offs = slot * stride_v_slot + token * stride_v_n
            # masked rows are never read: empty slots and stale tokens cost no bandwidth and cannot
            # leak non-finite values into the output (loading every row and masking afterwards, so
            # the loads need not wait for the table entry, measured no faster: benchmarks/NOTES.md)
            k = tl.load(k_base + k_offs[:, None], mask=mask_n[:, None], other=0.0)  # [BLOCK_N, HEAD_DIM]
            v = tl.load(v_base + v_offs[:, None], mask=mask_n[:, None], other=0.0)
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [BLOCK_G, BLOCK_N] fp32
            if USE_SOFTCAP:
                # tanh(x) = sign(x) (1 - e^{-2|x|}) / (1 + e^{-2|x|}): no overflow, no tl tanh needed
                x = qk * (scale / softcap)
                t = tl.exp2(tl.abs(x) * (-2.0 * _LOG2E))
                tanh_x = (1.0 - t) / (1.0 + t)
                s = tl.where(x < 0.0, -tanh_x, tanh_x) * (softcap * _LOG2E)
            else:
                s = qk * (scale * _LOG2E)
            s = tl.where(mask_n[None, :], s, float("-inf"))

            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new

        if USE_PDL:
            # let the merge launch now, while this grid's last programs finish: triggered at the start
            # instead, its programs sat on the SMs through the K/V loop (H200 run 26: MQA batch 1 at
            # 512K 14.8 -> 14.0 us, batch 32 at 128K 81.0 -> 77.7; llama batch 1 ~1% slower)
            tl.extra.cuda.gdc_launch_dependents()
        split = pid_s.to(tl.int64)
        o_ptrs = ws_o_ptr + pid_b * stride_wo_b + heads * stride_wo_h + split * stride_wo_s
        tl.store(o_ptrs[:, None] + offs_d[None, :], acc, mask=mask_g[:, None])
        ml_ptrs = ws_ml_ptr + pid_b * stride_wml_b + heads * stride_wml_h + split * stride_wml_s
        tl.store(ml_ptrs, m_i, mask=mask_g)
        tl.store(ml_ptrs + 1, l_i, mask=mask_g)

    @triton.jit
    def _decode_merge_kernel(
        ws_o_ptr, ws_ml_ptr, out_ptr, num_splits,
        stride_wo_b, stride_wo_h, stride_wo_s,
        stride_wml_b, stride_wml_h, stride_wml_s,
        stride_out_b, stride_out_h, stride_out_d,
        # the token at ``pos`` (``APPEND`` only; stand-ins otherwise)
        q_ptr, k_new_ptr, v_new_ptr, pos_ptr, valid_start_ptr, table_ptr,
        k_pool_ptr, v_pool_ptr, kmin_ptr, kmax_ptr, q_tap_ptr,
        group, num_chunks, num_bounds, slots_per_seq, scale, softcap,
        stride_q_b, stride_q_h, stride_q_d,
        stride_kn_b, stride_kn_h, stride_kn_d,
        stride_vn_b, stride_vn_h, stride_vn_d,
        stride_table_b, stride_table_n,
        stride_kp_row, stride_kp_tok, stride_kp_h, stride_kp_d,
        stride_vp_row, stride_vp_tok, stride_vp_h, stride_vp_d,
        stride_kmin_b, stride_kmin_n, stride_kmin_h, stride_kmin_d,
        stride_kmax_b, stride_kmax_n, stride_kmax_h, stride_kmax_d,
        stride_tap_b, stride_tap_h, stride_tap_d,
        TILE_S: tl.constexpr,
        BLOCK_D: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        USE_PDL: tl.constexpr,
        APPEND: tl.constexpr,
        USE_SOFTCAP: tl.constexpr,
        CHUNK: tl.constexpr,
    ):
        """One (sequence, query head, ``BLOCK_D`` slice of the head dim): merge the splits' partials.

        Any number of splits, ``TILE_S`` at a time: each lane keeps its own running max, sum and
        accumulator over the tiles (split ``t * TILE_S + lane``), and the lanes are combined at the end.
        Many splits take wide tiles over narrow slices (more programs, fewer serial steps).
        With ``USE_PDL`` the kernel is a programmatic dependent launch: it may start while the split
        kernel is still running and waits for its results (``griddepcontrol.wait``) before reading.

        ``APPEND`` (the split kernel ran with ``BEFORE_POS``): before waiting for the split partials
        (none of this touches them), the program computes the token's score ``q . k_new``, stores its
        slice of the query into ``q_tap``, and, in the first query head of each kv head's group, writes
        its slice of the token into the pool slot and folds the key into the chunk's bounds
        (``append_kv`` + ``update_chunk_index``, same rules). The split programs never read that row or
        those bounds, and every later reader is a later launch on the stream. In the merge the token
        joins as one more partial (value ``v_new``) where ``append_kv`` writes it (its chunk has a slot,
        ``chunk_slot[b, pos // C] >= 0``) and it is not left padding.
        """
        pid_b = tl.program_id(0).to(tl.int64)
        pid_h = tl.program_id(1).to(tl.int64)
        offs_s = tl.arange(0, TILE_S)
        offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
        if APPEND:
            # Inputs of the step that kernels before the split kernel wrote (complete before it began):
            # read, and the token's score computed, before waiting for the split partials.
            kv_head = pid_h // group
            offs_k = tl.arange(0, HEAD_DIM)
            q_row = tl.load(q_ptr + pid_b * stride_q_b + pid_h * stride_q_h + offs_k * stride_q_d)
            # the key as the pool holds it (its dtype), as the split kernel would have read it
            k_row = tl.load(k_new_ptr + pid_b * stride_kn_b + kv_head * stride_kn_h + offs_k * stride_kn_d)
            qk = tl.sum(q_row.to(tl.float32) * k_row.to(k_pool_ptr.dtype.element_ty).to(tl.float32), 0)
            if USE_SOFTCAP:
                x = qk * (scale / softcap)
                t = tl.exp2(tl.abs(x) * (-2.0 * _LOG2E))
                tanh_x = (1.0 - t) / (1.0 + t)
                s_new = tl.where(x < 0.0, -tanh_x, tanh_x) * (softcap * _LOG2E)
            else:
                s_new = qk * (scale * _LOG2E)
            v_new = tl.load(v_new_ptr + pid_b * stride_vn_b + kv_head * stride_vn_h + offs_d * stride_vn_d)
            v_new = v_new.to(v_pool_ptr.dtype.element_ty)
            pos = tl.load(pos_ptr)
            logical = pos // CHUNK
            offset = pos - logical * CHUNK
            slot = tl.load(table_ptr + pid_b * stride_table_b + logical * stride_table_n, mask=logical < num_chunks, other=-1)
            visible = (slot >= 0) & (pos >= tl.load(valid_start_ptr + pid_b))
            # The token's writes, also before the wait: the split programs never read the row at ``pos``
            # (masked), the bounds or the tap, and every later reader is a later (non-PDL) launch.
            q_part = tl.load(q_ptr + pid_b * stride_q_b + pid_h * stride_q_h + offs_d * stride_q_d)
            tl.store(q_tap_ptr + pid_b * stride_tap_b + pid_h * stride_tap_h + offs_d * stride_tap_d,
                     q_part.to(q_tap_ptr.dtype.element_ty))
            if pid_h % group == 0:
                k_part = tl.load(k_new_ptr + pid_b * stride_kn_b + kv_head * stride_kn_h + offs_d * stride_kn_d)
                # a chunk without a slot (-1) is not written anywhere (vector form of "slot >= 0")
                mask_w = (offs_d * 0 + slot) >= 0
                row = pid_b * slots_per_seq + slot
                k_dst = k_pool_ptr + row * stride_kp_row + offset * stride_kp_tok + kv_head * stride_kp_h + offs_d * stride_kp_d
                v_dst = v_pool_ptr + row * stride_vp_row + offset * stride_vp_tok + kv_head * stride_vp_h + offs_d * stride_vp_d
                tl.store(k_dst, k_part.to(k_pool_ptr.dtype.element_ty), mask=mask_w)
                tl.store(v_dst, v_new, mask=mask_w)
                # the chunk bounds, as ``_append_token_kernel`` folds them: the key in the bounds' dtype,
                # min/max in fp32 (exact), and the chunk's first token resets them
                mask_b = (offs_d * 0 + logical) < num_bounds
                kmin_ptrs = kmin_ptr + pid_b * stride_kmin_b + logical * stride_kmin_n + kv_head * stride_kmin_h + offs_d * stride_kmin_d
                kmax_ptrs = kmax_ptr + pid_b * stride_kmax_b + logical * stride_kmax_n + kv_head * stride_kmax_h + offs_d * stride_kmax_d
                key = k_part.to(kmin_ptr.dtype.element_ty).to(tl.float32)
                opens = (offs_d * 0 + offset) == 0
                old_min = tl.load(kmin_ptrs, mask=mask_b & ~opens, other=0.0).to(tl.float32)
                old_max = tl.load(kmax_ptrs, mask=mask_b & ~opens, other=0.0).to(tl.float32)
                new_min = tl.where(opens, key, tl.minimum(old_min, key))
                new_max = tl.where(opens, key, tl.maximum(old_max, key))
                tl.store(kmin_ptrs, new_min.to(kmin_ptr.dtype.element_ty), mask=mask_b)
                tl.store(kmax_ptrs, new_max.to(kmax_ptr.dtype.element_ty), mask=mask_b)
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
        o_base = ws_o_ptr + pid_b * stride_wo_b + pid_h * stride_wo_h
        ml_base = ws_ml_ptr + pid_b * stride_wml_b + pid_h * stride_wml_h

        # below every split's running max (>= _MAX_FLOOR): padding lanes stay finite (no inf - inf)
        m_lane = tl.full([TILE_S], 2 * _MAX_FLOOR, tl.float32)
        l_lane = tl.zeros([TILE_S], tl.float32)
        acc_lane = tl.zeros([TILE_S, BLOCK_D], tl.float32)
        for first in range(0, num_splits, TILE_S):
            split = first + offs_s
            mask_s = split < num_splits
            ml_ptrs = ml_base + split.to(tl.int64) * stride_wml_s
            m = tl.load(ml_ptrs, mask=mask_s, other=2 * _MAX_FLOOR)
            l = tl.load(ml_ptrs + 1, mask=mask_s, other=0.0)
            o_ptrs = o_base + split.to(tl.int64) * stride_wo_s
            acc = tl.load(o_ptrs[:, None] + offs_d[None, :], mask=mask_s[:, None], other=0.0)
            m_new = tl.maximum(m_lane, m)
            alpha = tl.exp2(m_lane - m_new)
            weight = tl.exp2(m - m_new)
            l_lane = l_lane * alpha + weight * l
            acc_lane = acc_lane * alpha[:, None] + weight[:, None] * acc
            m_lane = m_new

        m_all = tl.max(m_lane, 0)
        if APPEND:
            m_all = tl.where(visible, tl.maximum(m_all, s_new), m_all)
        weight = tl.exp2(m_lane - m_all)  # [TILE_S]; lanes that saw only padding weigh 0
        total = tl.sum(weight * l_lane, 0)
        acc_all = tl.sum(weight[:, None] * acc_lane, 0)
        if APPEND:
            w_new = tl.where(visible, tl.exp2(tl.minimum(s_new - m_all, 0.0)), 0.0)  # min: no overflow where unused
            total += w_new
            acc_all += w_new * v_new.to(tl.float32)
        # nothing attended at all (total 0, acc 0): write zeros rather than 0/0
        out = acc_all / tl.where(total > 0.0, total, 1.0)
        out_ptrs = out_ptr + pid_b * stride_out_b + pid_h * stride_out_h + offs_d * stride_out_d
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty))


# -- launch configuration ----------------------------------------------------------------------
# Fixed heuristics instead of triton.autotune: autotuning benchmarks on the first call of each
# shape (host syncs, impossible while a CUDA graph is being captured). The numbers were chosen
# with benchmarks/check_kernels_gpu.py --sweep and benchmarks/decode_attention.py --sweep-splits
# on an H200 (results and the runs behind them: benchmarks/NOTES.md).

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_SPLITS = 1024  # the merge walks the splits in tiles, so this only bounds the workspace
_MERGE_TILE = 256  # at most this many splits per merge step
_MERGE_TILE_ELEMENTS = 4096  # fp32 partials per merge step in registers: TILE_S x BLOCK_D
_KV_TILE_BYTES = 64 * 1024  # K + V bytes of one block: 2-3 pipeline stages stay inside shared memory
_SPLIT_WAVES = 2  # split-kernel programs resident per SM at once (two 3-stage K+V pipelines of 32 KB)
_PROGRAM_OVERHEAD_BLOCKS = 2  # one program's fixed cost (q load, table, partial store) in blocks
_INTERPRETER_SPLITS = 2
# One program per SM (not _SPLIT_WAVES) when that leaves each at most this many blocks: short
# programs are latency-bound and a second program on the SM slows both (H200 sweep, run 8:
# MQA batch 1 at 128K, 93 splits x 3 blocks 9.9 us against 139 x 2 blocks 10.8 us).
_LATENCY_BOUND_BLOCKS = 12
# Tokens per block of the pool at least, by default (a block then spans several slots when chunks are
# smaller; H200, run 22: 16-token chunks 1.75x faster at batch 8; 128 for 64-token chunks was slower).
_MIN_BLOCK_TOKENS = 64
# Query-group rows of the split kernel's tiles: at least 16 (tl.dot); padded to 64 on sm90 for
# groups of 32+ when every program has an SM to itself, so the dots compile to wgmma (2 barriers
# per block instead of 9, no shared-memory round trip of the K/V fragments): H200 run 23, MQA batch 1
# at 512K 14.6 against 16.0 us; with two programs per SM its 112 KB of shared memory lost (batch 8).
_WGMMA_ROWS = 64


def _decode_block_n(tokens: int, head_dim: int, elem_size: int) -> int:
    """Tokens per block: a whole chunk (or ring window) unless its K+V tile exceeds _KV_TILE_BYTES."""
    cap = max(16, _KV_TILE_BYTES // (2 * head_dim * elem_size))
    return max(16, min(triton.next_power_of_2(tokens), cap))


def _decode_config(head_dim: int, block_n: int, elem_size: int, num_warps: int | None, num_stages: int | None) -> dict:
    """Warps and pipeline stages of the split kernel (None: the heuristic)."""
    # H200, bf16, D=128, C=64 (sweep over warps 2/4/8, stages 1-4, 1-8 programs per SM): 4 warps and
    # 3 stages were best or within 4% of best at batch 1 and 8; a third stage only where it fits.
    kv_tile = 2 * block_n * head_dim * elem_size
    return dict(num_warps=4 if num_warps is None else num_warps,
                num_stages=(3 if 3 * kv_tile <= 160 * 1024 else 2) if num_stages is None else num_stages)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.lru_cache(maxsize=None)
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def _use_pdl(device: torch.device) -> bool:
    """Whether the merge can be a programmatic dependent launch (sm90+): it then starts while the split
    kernel runs and waits on the device for its results."""
    return device.type == "cuda" and _capability(device.index)[0] >= 9


def _group_rows(device: torch.device, dtype: torch.dtype, group: int, programs: int, requested: int | None = None) -> int:
    """Rows of the query-group tile (``BLOCK_G``): the group's own power of two (16 at least), padded
    to ``requested`` rows when given, else to ``_WGMMA_ROWS`` where that pays (16-bit inputs only: fp32
    dots run at "ieee" precision, which wgmma does not do)."""
    rows = max(16, triton.next_power_of_2(group))
    if requested is not None:
        return max(rows, requested)
    if (device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and _capability(device.index)[0] == 9
            and 32 <= rows < _WGMMA_ROWS and programs <= _sm_count(device.index)):
        return _WGMMA_ROWS
    return rows


@functools.lru_cache(maxsize=4096)
def _balanced_splits(programs: int, num_blocks: int, capacity: int) -> int:
    """Split count with the least modelled time: waves of ``capacity`` resident programs, each wave as
    long as its programs' blocks plus a fixed per-program cost; ties go to fewer splits (a smaller
    merge). Avoids a nearly empty last wave (e.g. 9 x 32 = 288 programs on 264 places)."""
    best, best_cost = 1, None
    for splits in range(1, min(_MAX_SPLITS, num_blocks) + 1):
        waves = -(-programs * splits // capacity)
        cost = waves * (-(-num_blocks // splits) + _PROGRAM_OVERHEAD_BLOCKS)
        if best_cost is None or cost < best_cost:
            best, best_cost = splits, cost
    return best


def _decode_num_splits(device: torch.device, programs: int, num_blocks: int, requested: int | None) -> tuple[int, int]:
    """(splits, blocks per split) for ``programs`` (sequence, kv head) pairs over ``num_blocks`` blocks.

    Shapes alone decide (never data), so a captured CUDA graph replays the same grid. One program
    per SM when that leaves each at most ``_LATENCY_BOUND_BLOCKS`` blocks (short, latency-bound
    programs), else the ``_balanced_splits`` wave model with ``_SPLIT_WAVES`` programs per SM.
    """
    if requested is not None:
        splits = requested
    elif device.type == "cuda":
        sms = _sm_count(device.index)
        one_per_sm = min(num_blocks, sms // programs)
        if one_per_sm >= 1 and -(-num_blocks // one_per_sm) <= _LATENCY_BOUND_BLOCKS:
            splits = one_per_sm
        else:
            splits = _balanced_splits(programs, num_blocks, _SPLIT_WAVES * sms)
    else:
        splits = _INTERPRETER_SPLITS
    splits = max(1, min(splits, _MAX_SPLITS, num_blocks))
    blocks_per_split = max(1, triton.cdiv(num_blocks, splits))
    return max(1, triton.cdiv(num_blocks, blocks_per_split)), blocks_per_split


# Split partials, reused across calls of the same shape. Not allocated while a CUDA graph is being
# captured (a buffer from the graph's private pool must not outlive the call in a global cache): a
# step captured before any eager call of its shape allocates per call, which the graph replays free.
_WORKSPACES: dict[tuple, tuple[Tensor, Tensor]] = {}


def _workspace(device: torch.device, batch: int, q_heads: int, splits: int, head_dim: int) -> tuple[Tensor, Tensor]:
    """(accumulators ``[B, Hq, splits, D]``, running max and sum ``[B, Hq, splits, 2]``), both fp32.

    The max and sum sit apart from the accumulators, so the merge reads them for many splits in a
    few contiguous sectors (faster at batch 1 than one ``[..., D + 2]`` row per split: runs 19-21).
    Partials in the inputs' 16-bit dtype were slower on the H200 (run 18).
    """
    key = (device, batch, q_heads, splits, head_dim)
    ws = _WORKSPACES.get(key)
    if ws is None:
        ws = (torch.empty(batch, q_heads, splits, head_dim, dtype=torch.float32, device=device),
              torch.empty(batch, q_heads, splits, 2, dtype=torch.float32, device=device))
        if not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            _WORKSPACES[key] = ws
    return ws


# -- launchers ---------------------------------------------------------------------------------


def _is_pow2_in(n: int, lo: int, hi: int) -> bool:
    return lo <= n <= hi and n & (n - 1) == 0


def _is_pow2_int(n, lo: int, hi: int) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and _is_pow2_in(n, lo, hi)


def _check_launch_options(
    name: str, device: torch.device, *, min_block_tokens: int | None, group_rows: int | None,
    num_warps: int | None, num_stages: int | None, pdl: bool | None,
) -> bool:
    """Refuse launch options the kernels cannot take (ValueError); returns whether to use PDL."""
    if min_block_tokens is not None and not _is_pow2_int(min_block_tokens, 16, 256):
        raise ValueError(f"{name}: min_block_tokens={min_block_tokens!r}: give a power of two from 16 to 256 (default {_MIN_BLOCK_TOKENS})")
    if group_rows is not None and not _is_pow2_int(group_rows, 16, 128):
        raise ValueError(f"{name}: group_rows={group_rows!r}: give a power of two from 16 to 128, or None for the heuristic")
    if num_warps is not None and not _is_pow2_int(num_warps, 1, 16):
        raise ValueError(f"{name}: num_warps={num_warps!r}: give a power of two from 1 to 16, or None for the heuristic")
    if num_stages is not None and not (isinstance(num_stages, int) and 1 <= num_stages <= 8):
        raise ValueError(f"{name}: num_stages={num_stages!r}: give a whole number from 1 to 8, or None for the heuristic")
    if pdl is None:
        return _use_pdl(device)
    if pdl and not _use_pdl(device):
        raise ValueError(f"{name}: pdl=True needs a CUDA GPU of compute capability 9.0 or later, got {device}")
    return bool(pdl)


def _decode_problem(q: Tensor, k: Tensor, v: Tensor, pos: Tensor, valid_start: Tensor) -> str | None:
    """Why the Triton kernels cannot take these operands (None: they can)."""
    if triton is None:
        return "Triton is not installed"
    if q.dim() != 3 or k.dim() != 4 or k.shape != v.shape:
        return f"q must be [B, Hq, D] and K/V equal [., ., Hkv, D], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
    if k.shape[3] != q.shape[2] or k.shape[2] == 0 or q.shape[1] % k.shape[2]:
        return f"q {tuple(q.shape)} and K/V {tuple(k.shape)} disagree on heads or head_dim"
    if q.dtype not in _SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"q/K/V dtypes {q.dtype}/{k.dtype}/{v.dtype}: need one of fp16, bf16, fp32 for all three"
    if not _is_pow2_in(q.shape[2], 16, 256):
        return f"head_dim {q.shape[2]} is not a power of two in 16..256"
    if pos.numel() != 1 or pos.dtype != torch.int64:
        return f"pos must be one int64, got {pos.dtype} of shape {tuple(pos.shape)}"
    if valid_start.shape != (q.shape[0],) or valid_start.dtype != torch.int64:
        return f"valid_start must be [B] int64, got {valid_start.dtype} of shape {tuple(valid_start.shape)}"
    if len({t.device for t in (q, k, v, pos, valid_start)}) != 1:
        return "operands live on different devices"
    return None


def _sparse_problem(q, k_pool, v_pool, slot_chunk, pos, valid_start) -> str | None:
    problem = _decode_problem(q, k_pool, v_pool, pos, valid_start)
    if problem is not None:
        return problem
    if slot_chunk.dim() != 2 or slot_chunk.dtype != torch.int64 or slot_chunk.device != q.device:
        return f"slot_chunk must be [B, S] int64 on q's device, got {slot_chunk.dtype} {tuple(slot_chunk.shape)}"
    if slot_chunk.shape[0] != q.shape[0] or k_pool.shape[0] != slot_chunk.numel():
        return f"pool {tuple(k_pool.shape)} and slot table {tuple(slot_chunk.shape)} do not match batch {q.shape[0]}"
    if not _is_pow2_in(k_pool.shape[1], 16, 128):
        return f"chunk size {k_pool.shape[1]} is not a power of two in 16..128"
    return None


def _append_problem(q, k_pool, v_pool, slot_chunk, pos, valid_start, k_new, v_new, chunk_slot, kmin, kmax, q_tap) -> str | None:
    """Why the fused attention + append kernels cannot take these operands (None: they can)."""
    problem = _sparse_problem(q, k_pool, v_pool, slot_chunk, pos, valid_start)
    if problem is not None:
        return problem
    token = (q.shape[0], *k_pool.shape[2:])
    if tuple(k_new.shape) != token or tuple(v_new.shape) != token:
        return f"k_new/v_new {tuple(k_new.shape)} / {tuple(v_new.shape)} must be [B, Hkv, D] = {token}"
    if chunk_slot.dim() != 2 or chunk_slot.shape[0] != q.shape[0] or chunk_slot.dtype != torch.int64:
        return f"chunk_slot must be [B, N] int64, got {chunk_slot.dtype} {tuple(chunk_slot.shape)}"
    if kmin.shape != kmax.shape or kmin.dim() != 4 or tuple(kmin.shape[2:]) != token[1:] or kmin.shape[0] != q.shape[0]:
        return f"bounds {tuple(kmin.shape)} / {tuple(kmax.shape)} must be [B, N, Hkv, D] for token {token}"
    if tuple(q_tap.shape) != tuple(q.shape):
        return f"q_tap {tuple(q_tap.shape)} must be shaped like q {tuple(q.shape)}"
    if any(t.dtype not in _SUPPORTED_DTYPES for t in (k_new, v_new, kmin, kmax, q_tap)):
        return "k_new, v_new, the bounds and q_tap must be fp16, bf16 or fp32"
    if len({t.device for t in (q, k_new, v_new, chunk_slot, kmin, kmax, q_tap)}) != 1:
        return "operands live on different devices"
    return None


def _ring_problem(q, k_ring, v_ring, pos, valid_start) -> str | None:
    problem = _decode_problem(q, k_ring, v_ring, pos, valid_start)
    if problem is None and k_ring.shape[0] != q.shape[0]:
        problem = f"ring {tuple(k_ring.shape)} does not match batch {q.shape[0]}"
    return problem


@functools.lru_cache(maxsize=None)
def _warn_reference_fallback(op: str, problem: str) -> None:
    warnings.warn(f"lsa::{op} runs its PyTorch reference on CUDA: {problem}", RuntimeWarning, stacklevel=3)


def _launch_decode(
    q: Tensor, k: Tensor, v: Tensor, table: Tensor, pos: Tensor, valid_start: Tensor, *,
    is_ring: bool, chunk: int, block_n: int, num_blocks: int, window: int,
    k_strides: tuple[int, int, int], v_strides: tuple[int, int, int],
    scale: float, softcap: float, num_splits: int | None, group_rows: int | None,
    num_warps: int | None, num_stages: int | None, pdl: bool, out: Tensor | None, append: dict | None = None,
) -> Tensor:
    """Shared by the launchers. ``*_strides``: (sequence, slot, token) strides of K/V. ``append``: the
    token at ``pos`` and the tensors it is written to (see ``_launch_merge``); the split kernel then
    reads the pool strictly below ``pos``."""
    batch, q_heads, head_dim = q.shape
    kv_heads = k.shape[2]
    group = q_heads // kv_heads
    if out is None:
        out = torch.empty_like(q)  # strides as the fake implementation's empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(f"out must be like q {tuple(q.shape)} {q.dtype}, got {tuple(out.shape)} {out.dtype} on {out.device}")
    if out.numel() == 0:
        return out
    splits, blocks_per_split = _decode_num_splits(q.device, batch * kv_heads, num_blocks, num_splits)
    ws_o, ws_ml = _workspace(q.device, batch, q_heads, splits, head_dim)
    config = _decode_config(head_dim, block_n, q.element_size(), num_warps, num_stages)

    _decode_split_kernel[(batch, kv_heads, splits)](
        q, k, v, table, pos, valid_start, ws_o, ws_ml,
        num_blocks, blocks_per_split, group, window, float(scale), float(softcap),
        q.stride(0), q.stride(1), q.stride(2),
        *k_strides, k.stride(2), k.stride(3),
        *v_strides, v.stride(2), v.stride(3),
        table.stride(0) if table.dim() == 2 else 0, table.stride(1) if table.dim() == 2 else 0,
        ws_o.stride(0), ws_o.stride(1), ws_o.stride(2),
        ws_ml.stride(0), ws_ml.stride(1), ws_ml.stride(2),
        IS_RING=is_ring,
        USE_SOFTCAP=softcap > 0.0,
        CHUNK=chunk,
        BLOCK_N=block_n,
        BLOCK_G=_group_rows(q.device, q.dtype, group, batch * kv_heads * splits, group_rows),
        HEAD_DIM=head_dim,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        USE_PDL=pdl,
        BEFORE_POS=append is not None,
        **config,
    )
    _launch_merge((ws_o, ws_ml), out, splits, pdl=pdl, append=append, scale=scale, softcap=softcap)
    return out


def _sparse_blocks(slots: int, chunk: int, head_dim: int, elem_size: int, min_block_tokens: int) -> tuple[int, int]:
    """(tokens per block, blocks per sequence) of a pool of ``slots`` chunks of ``chunk`` tokens."""
    block_n = _decode_block_n(max(chunk, min_block_tokens), head_dim, elem_size)
    return block_n, slots * (chunk // block_n) if block_n <= chunk else triton.cdiv(slots, block_n // chunk)


def sparse_launch_plan(
    q: Tensor,
    k_pool: Tensor,
    slot_chunk: Tensor,
    *,
    num_splits: int | None = None,
    min_block_tokens: int = _MIN_BLOCK_TOKENS,
    group_rows: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    pdl: bool | None = None,
) -> dict:
    """What ``sparse_decode_attention_triton`` launches for these operands and launch options (shapes
    alone decide): tokens per block, blocks per sequence, the split count, the query-group rows,
    warps and stages of the split kernel, and whether the merge is a programmatic dependent launch.
    For benchmarks and reports; takes the launcher's options (see ``sparse_decode_attention_triton``).
    """
    pdl = _check_launch_options(
        "sparse_launch_plan", q.device, min_block_tokens=min_block_tokens, group_rows=group_rows,
        num_warps=num_warps, num_stages=num_stages, pdl=pdl,
    )
    chunk, kv_heads, head_dim = k_pool.shape[1:]
    block_n, num_blocks = _sparse_blocks(slot_chunk.shape[1], chunk, head_dim, k_pool.element_size(), min_block_tokens)
    programs = q.shape[0] * kv_heads
    splits, _ = _decode_num_splits(q.device, programs, num_blocks, num_splits)
    rows = _group_rows(q.device, q.dtype, q.shape[1] // kv_heads, programs * splits, group_rows)
    config = _decode_config(head_dim, block_n, k_pool.element_size(), num_warps, num_stages)
    return dict(block_tokens=block_n, blocks=num_blocks, splits=splits, group_rows=rows, **config, pdl=pdl)


def _merge_tiles(splits: int, head_dim: int) -> tuple[int, int]:
    """(TILE_S, BLOCK_D) of the merge: all splits in one step where they fit, over a slice of the head
    dim narrow enough to keep ``_MERGE_TILE_ELEMENTS`` partials per step."""
    tile_s = max(2, min(_MERGE_TILE, triton.next_power_of_2(splits)))
    block_d = min(head_dim, max(16, _MERGE_TILE_ELEMENTS // tile_s))
    return tile_s, block_d


def _launch_merge(
    ws: tuple[Tensor, Tensor], out: Tensor, splits: int, *, pdl: bool = False, append: dict | None = None,
    scale: float = 1.0, softcap: float = 0.0,
) -> None:
    """The merge kernel over ``splits`` partials of ``ws`` (see ``_workspace``) into ``out``: one
    program per query head and slice of the head dim; ``pdl``: a programmatic dependent launch (the
    split kernel before it must have been launched with ``USE_PDL``). ``append`` (keys ``q``,
    ``k_new``, ``v_new``, ``pos``, ``valid_start``, ``chunk_slot``, ``k_pool``, ``v_pool``, ``kmin``,
    ``kmax``, ``q_tap``): add the token at ``pos`` and write it (the split kernel must have run with
    ``BEFORE_POS``); ``scale``/``softcap`` are its score's."""
    extra = {"launch_pdl": True} if pdl else {}
    batch, q_heads, head_dim = out.shape
    tile_s, block_d = _merge_tiles(splits, head_dim)
    if append is None:
        # stand-ins for the token's operands: the APPEND branch is compiled out
        a = dict(q=out, k_new=out, v_new=out, pos=out, valid_start=out, chunk_slot=out.view(batch, -1),
                 k_pool=out.unsqueeze(0), v_pool=out.unsqueeze(0), kmin=out.unsqueeze(0), kmax=out.unsqueeze(0), q_tap=out)
        group = num_chunks = num_bounds = slots_per_seq = 1
    else:
        a = append
        group = q_heads // a["k_pool"].shape[2]
        num_chunks, num_bounds = a["chunk_slot"].shape[1], a["kmin"].shape[1]
        slots_per_seq = a["k_pool"].shape[0] // batch
    _decode_merge_kernel[(batch, q_heads, head_dim // block_d)](
        ws[0], ws[1], out, splits,
        ws[0].stride(0), ws[0].stride(1), ws[0].stride(2),
        ws[1].stride(0), ws[1].stride(1), ws[1].stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        a["q"], a["k_new"], a["v_new"], a["pos"], a["valid_start"], a["chunk_slot"],
        a["k_pool"], a["v_pool"], a["kmin"], a["kmax"], a["q_tap"],
        group, num_chunks, num_bounds, slots_per_seq, float(scale), float(softcap),
        a["q"].stride(0), a["q"].stride(1), a["q"].stride(2),
        a["k_new"].stride(0), a["k_new"].stride(1), a["k_new"].stride(2),
        a["v_new"].stride(0), a["v_new"].stride(1), a["v_new"].stride(2),
        a["chunk_slot"].stride(0), a["chunk_slot"].stride(1),
        *a["k_pool"].stride(), *a["v_pool"].stride(), *a["kmin"].stride(), *a["kmax"].stride(),
        a["q_tap"].stride(0), a["q_tap"].stride(1), a["q_tap"].stride(2),
        TILE_S=tile_s,
        BLOCK_D=block_d,
        HEAD_DIM=head_dim,
        USE_PDL=pdl,
        APPEND=append is not None,
        USE_SOFTCAP=softcap > 0.0,
        CHUNK=a["k_pool"].shape[1] if append is not None else 1,
        num_warps=4,
        **extra,
    )


def sparse_decode_attention_triton(
    q: Tensor,
    k_pool: Tensor,
    v_pool: Tensor,
    slot_chunk: Tensor,
    pos: Tensor,
    valid_start: Tensor,
    *,
    scale: float,
    softcap: float = 0.0,
    num_splits: int | None = None,
    min_block_tokens: int = _MIN_BLOCK_TOKENS,
    group_rows: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    pdl: bool | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """Triton launcher of ``lsa::sparse_decode_attention`` (CUDA; CPU tensors under ``TRITON_INTERPRET=1``).

    Two launches, no host sync: the split kernel on grid ``(B, Hkv, splits)`` and the merge kernel on
    ``(B, Hq, D / BLOCK_D)`` (a programmatic dependent launch on sm90+). Writes ``out`` (like ``q``)
    when given, else allocates it; the workspace of split partials is cached per shape (see
    ``_workspace``). ``sparse_launch_plan`` reports what a call launches.

    Launch options (the op uses the defaults; anything else is for benchmarks):

    - ``num_splits``: the split count (None: from the shapes and the GPU's SM count, see
      ``_decode_num_splits``);
    - ``min_block_tokens``: tokens per block at least, a power of two from 16 to 256: chunks shorter
      than that are read several slots per block;
    - ``group_rows``: rows of the query-group tile at least, a power of two from 16 to 128 (never
      fewer than the group's own power of two; None: padded to 64 on sm90 where that pays, see
      ``_WGMMA_ROWS``);
    - ``num_warps``, ``num_stages``: of the split kernel (None: 4 warps, 3 stages where they fit);
    - ``pdl``: launch the merge as a programmatic dependent launch (None: on sm90+; True elsewhere is
      refused).
    """
    return _launch_sparse(
        q, k_pool, v_pool, slot_chunk, pos, valid_start, append=None, scale=scale, softcap=softcap, num_splits=num_splits,
        min_block_tokens=min_block_tokens, group_rows=group_rows, num_warps=num_warps, num_stages=num_stages, pdl=pdl, out=out,
    )


def _launch_sparse(
    q: Tensor, k_pool: Tensor, v_pool: Tensor, slot_chunk: Tensor, pos: Tensor, valid_start: Tensor, *,
    append: dict[str, Tensor] | None, scale: float, softcap: float, num_splits: int | None, min_block_tokens: int,
    group_rows: int | None, num_warps: int | None, num_stages: int | None, pdl: bool | None, out: Tensor | None,
) -> Tensor:
    """The two launchers' shared body: checks, the block plan over the slot table, the launches;
    ``append`` (the token's operands by name) makes it the fused op's."""
    op = "sparse_decode_attention" if append is None else "sparse_decode_attention_append"
    use_pdl = _check_launch_options(
        f"{op} (Triton)", q.device, min_block_tokens=min_block_tokens, group_rows=group_rows,
        num_warps=num_warps, num_stages=num_stages, pdl=pdl,
    )
    if append is None:
        problem = _sparse_problem(q, k_pool, v_pool, slot_chunk, pos, valid_start)
    else:
        problem = _append_problem(q, k_pool, v_pool, slot_chunk, pos, valid_start, *(append[name] for name in _APPEND_OPERANDS))
    if problem is not None:
        raise ValueError(f"{op} (Triton): {problem}")
    slots = slot_chunk.shape[1]
    chunk, _, head_dim = k_pool.shape[1:]
    block_n, num_blocks = _sparse_blocks(slots, chunk, head_dim, k_pool.element_size(), min_block_tokens)
    if append is not None:
        append = dict(append, q=q, pos=pos, valid_start=valid_start, k_pool=k_pool, v_pool=v_pool)
    return _launch_decode(
        q, k_pool, v_pool, slot_chunk, pos, valid_start,
        is_ring=False, chunk=chunk, block_n=block_n, window=slots, num_blocks=num_blocks,
        k_strides=(slots * k_pool.stride(0), k_pool.stride(0), k_pool.stride(1)),
        v_strides=(slots * v_pool.stride(0), v_pool.stride(0), v_pool.stride(1)),
        scale=scale, softcap=softcap, num_splits=num_splits, group_rows=group_rows,
        num_warps=num_warps, num_stages=num_stages, pdl=use_pdl, out=out, append=append,
    )


_APPEND_OPERANDS = ("k_new", "v_new", "chunk_slot", "kmin", "kmax", "q_tap")  # _append_problem's order after the attention's


def sparse_decode_attention_append_triton(
    q: Tensor,
    k_pool: Tensor,
    v_pool: Tensor,
    slot_chunk: Tensor,
    pos: Tensor,
    valid_start: Tensor,
    k_new: Tensor,
    v_new: Tensor,
    chunk_slot: Tensor,
    kmin: Tensor,
    kmax: Tensor,
    q_tap: Tensor,
    *,
    scale: float,
    softcap: float = 0.0,
    num_splits: int | None = None,
    min_block_tokens: int = _MIN_BLOCK_TOKENS,
    group_rows: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    pdl: bool | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """Triton launcher of ``lsa::sparse_decode_attention_append``: the two launches of
    ``sparse_decode_attention_triton`` and nothing else. The split kernel reads the pool strictly below
    ``pos``; the merge kernel adds the token at ``pos`` (``k_new``/``v_new`` ``[B, Hkv, D]``) as one
    more partial, writes it into its pool slot and chunk bounds (``append_kv`` + ``update_chunk_index``,
    chunk size: the pool's) and copies ``q`` into ``q_tap`` (``lsa::tap``). Same launch options.
    """
    append = dict(k_new=k_new, v_new=v_new, chunk_slot=chunk_slot, kmin=kmin, kmax=kmax, q_tap=q_tap)
    return _launch_sparse(
        q, k_pool, v_pool, slot_chunk, pos, valid_start, append=append, scale=scale, softcap=softcap, num_splits=num_splits,
        min_block_tokens=min_block_tokens, group_rows=group_rows, num_warps=num_warps, num_stages=num_stages, pdl=pdl, out=out,
    )


def ring_decode_attention_triton(
    q: Tensor,
    k_ring: Tensor,
    v_ring: Tensor,
    pos: Tensor,
    valid_start: Tensor,
    *,
    scale: float,
    softcap: float = 0.0,
    num_splits: int | None = None,
    group_rows: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    pdl: bool | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """Triton launcher of ``lsa::ring_decode_attention``: the sparse kernel with ring positions.

    The ring ``[B, W, Hkv, D]`` is cut into blocks of ``BLOCK_N`` tokens (any ``W``; the last block is
    masked); otherwise, launch options included, as ``sparse_decode_attention_triton`` (no
    ``min_block_tokens``: a ring block is as long as the window and the K/V tile allow).
    """
    use_pdl = _check_launch_options(
        "ring_decode_attention (Triton)", q.device, min_block_tokens=None, group_rows=group_rows,
        num_warps=num_warps, num_stages=num_stages, pdl=pdl,
    )
    problem = _ring_problem(q, k_ring, v_ring, pos, valid_start)
    if problem is not None:
        raise ValueError(f"ring_decode_attention (Triton): {problem}")
    window, _, head_dim = k_ring.shape[1:]
    block_n = _decode_block_n(window, head_dim, k_ring.element_size())
    return _launch_decode(
        q, k_ring, v_ring, pos, pos, valid_start,
        is_ring=True, chunk=block_n, block_n=block_n, num_blocks=triton.cdiv(window, block_n), window=max(window, 1),
        k_strides=(k_ring.stride(0), 0, k_ring.stride(1)),
        v_strides=(v_ring.stride(0), 0, v_ring.stride(1)),
        scale=scale, softcap=softcap, num_splits=num_splits, group_rows=group_rows,
        num_warps=num_warps, num_stages=num_stages, pdl=use_pdl, out=out,
    )


# -- op registration ---------------------------------------------------------------------------


def _check_query(name: str, q: Tensor, k: Tensor, v: Tensor, pos: Tensor, valid_start: Tensor) -> None:
    if q.dim() != 3:
        raise ValueError(f"{name}: q must be [B, Hq, D], got {tuple(q.shape)}")
    if k.dim() != 4 or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"{name}: keys {tuple(k.shape)} do not match q {tuple(q.shape)} (head_dim)")
    if v.shape != k.shape:
        raise ValueError(f"{name}: values {tuple(v.shape)} and keys {tuple(k.shape)} differ in shape")
    if q.shape[1] % k.shape[2]:
        raise ValueError(f"{name}: {q.shape[1]} query heads are not a multiple of {k.shape[2]} kv heads")
    if pos.numel() != 1:
        raise ValueError(f"{name}: pos must hold one position, got shape {tuple(pos.shape)}")
    if tuple(valid_start.shape) != (q.shape[0],):
        raise ValueError(f"{name}: valid_start must be [B] = [{q.shape[0]}], got {tuple(valid_start.shape)}")


@torch.library.custom_op("lsa::sparse_decode_attention", mutates_args=())
def sparse_decode_attention(
    q: Tensor,
    k_pool: Tensor,
    v_pool: Tensor,
    slot_chunk: Tensor,
    pos: Tensor,
    valid_start: Tensor,
    scale: float,
    softcap: float = 0.0,
) -> Tensor:
    """Attention of one query token per sequence over its resident chunks.

    Example::

        >>> q = torch.randn(1, 4, 8)
        >>> k = torch.randn(1 * 2, 16, 2, 8); v = torch.randn_like(k)
        >>> table = torch.tensor([[0, 3]])  # slot 0 holds chunk 0, slot 1 chunk 3
        >>> out = sparse_decode_attention(q, k, v, table, torch.tensor([50]), torch.zeros(1, dtype=torch.long), 8 ** -0.5)
        >>> out.shape
        torch.Size([1, 4, 8])
    """
    _check_query("sparse_decode_attention", q, k_pool, v_pool, pos, valid_start)
    if slot_chunk.dim() != 2 or k_pool.shape[0] != slot_chunk.shape[0] * slot_chunk.shape[1] or slot_chunk.shape[0] != q.shape[0]:
        raise ValueError(
            f"sparse_decode_attention: pool {tuple(k_pool.shape)} and slot table {tuple(slot_chunk.shape)} do not match batch {q.shape[0]}"
        )
    if q.is_cuda:
        problem = _sparse_problem(q, k_pool, v_pool, slot_chunk, pos, valid_start)
        if problem is None:
            return sparse_decode_attention_triton(
                q, k_pool, v_pool, slot_chunk, pos, valid_start, scale=scale, softcap=softcap
            )
        _warn_reference_fallback("sparse_decode_attention", problem)
    return sparse_decode_attention_ref(q, k_pool, v_pool, slot_chunk, pos, valid_start, scale=scale, softcap=softcap)


@sparse_decode_attention.register_fake
def _(q, k_pool, v_pool, slot_chunk, pos, valid_start, scale, softcap=0.0):
    return torch.empty_like(q)


@torch.library.custom_op("lsa::sparse_decode_attention_append", mutates_args=("k_pool", "v_pool", "kmin", "kmax", "q_tap"))
def sparse_decode_attention_append(
    q: Tensor,
    k_pool: Tensor,
    v_pool: Tensor,
    slot_chunk: Tensor,
    pos: Tensor,
    valid_start: Tensor,
    k_new: Tensor,
    v_new: Tensor,
    chunk_slot: Tensor,
    kmin: Tensor,
    kmax: Tensor,
    q_tap: Tensor,
    scale: float,
    softcap: float = 0.0,
) -> Tensor:
    """One decode step of a sparse layer's store: append the token at ``pos`` (``append_kv``), fold its
    key into its chunk's bounds (``update_chunk_index``, chunk size: the pool's), tap the query
    (``tap``), and return ``sparse_decode_attention`` over the pool with the token in it.

    On CUDA this is the two launches of the attention alone: the token is added in the merge, which
    also writes it (see ``sparse_decode_attention_append_triton``).

    Example::

        >>> q = torch.randn(1, 4, 8); k_new = torch.randn(1, 2, 8); v_new = torch.randn(1, 2, 8)
        >>> k = torch.randn(1 * 2, 16, 2, 8); v = torch.randn_like(k)
        >>> slot_chunk = torch.tensor([[0, 3]]); chunk_slot = torch.tensor([[0, -1, -1, 1]])
        >>> kmin = torch.zeros(1, 4, 2, 8); kmax = torch.zeros(1, 4, 2, 8); q_tap = torch.zeros(1, 4, 8)
        >>> out = sparse_decode_attention_append(q, k, v, slot_chunk, torch.tensor([50]), torch.zeros(1, dtype=torch.long),
        ...                                      k_new, v_new, chunk_slot, kmin, kmax, q_tap, 8 ** -0.5)
        >>> bool(torch.equal(k[1, 50 - 48], k_new[0]))
        True
    """
    _check_query("sparse_decode_attention_append", q, k_pool, v_pool, pos, valid_start)
    if slot_chunk.dim() != 2 or k_pool.shape[0] != slot_chunk.shape[0] * slot_chunk.shape[1] or slot_chunk.shape[0] != q.shape[0]:
        raise ValueError(
            f"sparse_decode_attention_append: pool {tuple(k_pool.shape)} and slot table {tuple(slot_chunk.shape)} do not match batch {q.shape[0]}"
        )
    _check_append(k_pool, v_pool, k_new, v_new, pos, chunk_slot)
    _check_bounds(kmin, kmax, k_new)
    if q_tap.numel() != q.numel():
        raise ValueError(f"sparse_decode_attention_append: q_tap {tuple(q_tap.shape)} and q {tuple(q.shape)} differ in size")
    if q.is_cuda:
        problem = _append_problem(q, k_pool, v_pool, slot_chunk, pos, valid_start, k_new, v_new, chunk_slot, kmin, kmax, q_tap)
        if problem is None:
            return sparse_decode_attention_append_triton(
                q, k_pool, v_pool, slot_chunk, pos, valid_start, k_new, v_new, chunk_slot, kmin, kmax, q_tap,
                scale=scale, softcap=softcap,
            )
        _warn_reference_fallback("sparse_decode_attention_append", problem)
    return sparse_decode_attention_append_ref(
        q, k_pool, v_pool, slot_chunk, pos, valid_start, k_new, v_new, chunk_slot, kmin, kmax, q_tap, scale=scale, softcap=softcap
    )


@sparse_decode_attention_append.register_fake
def _(q, k_pool, v_pool, slot_chunk, pos, valid_start, k_new, v_new, chunk_slot, kmin, kmax, q_tap, scale, softcap=0.0):
    return torch.empty_like(q)


@torch.library.custom_op("lsa::ring_decode_attention", mutates_args=())
def ring_decode_attention(
    q: Tensor, k_ring: Tensor, v_ring: Tensor, pos: Tensor, valid_start: Tensor, scale: float, softcap: float = 0.0
) -> Tensor:
    """Exact attention of one query token per sequence over a sliding-window ring ``[B, W, Hkv, D]``."""
    _check_query("ring_decode_attention", q, k_ring, v_ring, pos, valid_start)
    if k_ring.shape[0] != q.shape[0]:
        raise ValueError(f"ring_decode_attention: ring batch {k_ring.shape[0]} differs from the query's {q.shape[0]}")
    if q.is_cuda:
        problem = _ring_problem(q, k_ring, v_ring, pos, valid_start)
        if problem is None:
            return ring_decode_attention_triton(q, k_ring, v_ring, pos, valid_start, scale=scale, softcap=softcap)
        _warn_reference_fallback("ring_decode_attention", problem)
    return ring_decode_attention_ref(q, k_ring, v_ring, pos, valid_start, scale=scale, softcap=softcap)


@ring_decode_attention.register_fake
def _(q, k_ring, v_ring, pos, valid_start, scale, softcap=0.0):
    return torch.empty_like(q)
