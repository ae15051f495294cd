"""Triton kernel of channel_topk_update: one program per channel. It scans the channel's
maps BLOCK_B images at a time (row max and first argmax per tile of BLOCK_HW positions) and
merges each block of candidates into the list it holds in registers: every entry's new slot
is its rank in the union (ties by union index), gathered back by one-hot sums."""
import torch
import triton
import triton.language as tl

# The key of padding rows and slots: worse than every real entry and every empty slot.
_WORST_ID = 2**62


@triton.jit
def _better(va, ia, pa, vb, ib, pb):
    # The shared order: value descending, then image id ascending, then position ascending.
    return (va > vb) | ((va == vb) & ((ia < ib) | ((ia == ib) & (pa < pb))))


@triton.jit
def _channel_topk_update_kernel(act_ptr, ids_ptr, rv_ptr, ri_ptr, rp_ptr, ov_ptr, oi_ptr, op_ptr,
                                nan_ptr, B, C, HW, K, WORST_ID: tl.constexpr,
                                BLOCK_B: tl.constexpr, BLOCK_HW: tl.constexpr,
                                BLOCK_K: tl.constexpr):
    c = tl.program_id(0).to(tl.int64)
    slots = tl.arange(0, BLOCK_K)
    in_list = slots < K
    v = tl.load(rv_ptr + c * K + slots, mask=in_list, other=float("-inf")).to(tl.float32)
    i = tl.load(ri_ptr + c * K + slots, mask=in_list, other=WORST_ID)
    p = tl.load(rp_ptr + c * K + slots, mask=in_list, other=WORST_ID)
    rows = tl.arange(0, BLOCK_B)
    cols = tl.arange(0, BLOCK_HW)
    nan_count = tl.zeros([BLOCK_B], tl.int32)
    for b0 in range(0, B, BLOCK_B):
        b = b0 + rows
        row_ok = b < B
        base = act_ptr + (b.to(tl.int64) * C + c) * HW
        best = tl.full([BLOCK_B], float("-inf"), tl.float32)
        arg = tl.zeros([BLOCK_B], tl.int64)
        for s in range(0, HW, BLOCK_HW):
            q = s + cols
            m = row_ok[:, None] & (q < HW)[None, :]
            x = tl.load(base[:, None] + q[None, :], mask=m, other=float("-inf")).to(tl.float32)
            nan_count += tl.sum((x != x).to(tl.int32), 1)
            tile_max = tl.max(x, 1)
            tile_arg = tl.argmax(x, 1, tie_break_left=True)
            # strict: an equal maximum in a later tile keeps the first occurrence
            take = tile_max > best
            arg = tl.where(take, s + tile_arg.to(tl.int64), arg)
            best = tl.where(take, tile_max, best)
        qv = tl.where(row_ok, best, float("-inf"))
        qi = tl.load(ids_ptr + b, mask=row_ok, other=WORST_ID)
        qp = tl.where(row_ok, arg, WORST_ID)
        # Rank of each list entry and candidate in the union (list first, then candidates).
        ll = _better(v[:, None], i[:, None], p[:, None], v[None, :], i[None, :], p[None, :])
        same = (v[:, None] == v[None, :]) & (i[:, None] == i[None, :]) & (p[:, None] == p[None, :])
        ll = ll | (same & (slots[:, None] < slots[None, :]))
        ql = _better(qv[:, None], qi[:, None], qp[:, None], v[None, :], i[None, :], p[None, :])
        qq = _better(qv[:, None], qi[:, None], qp[:, None], qv[None, :], qi[None, :], qp[None, :])
        qsame = (qv[:, None] == qv[None, :]) & (qi[:, None] == qi[None, :]) & (qp[:, None] == qp[None, :])
        qq = qq | (qsame & (rows[:, None] < rows[None, :]))
        rank_l = tl.sum(ll.to(tl.int32), 0) + tl.sum(ql.to(tl.int32), 0)
        rank_q = tl.sum((~ql).to(tl.int32), 1) + tl.sum(qq.to(tl.int32), 0)
        # Gather by rank: slot t takes the one entry of rank t.
        hit_l = rank_l[None, :] == slots[:, None]
        hit_q = rank_q[None, :] == slots[:, None]
        v = tl.sum(tl.where(hit_l, v[None, :], 0.0), 1) + tl.sum(tl.where(hit_q, qv[None, :], 0.0), 1)
        i = tl.sum(tl.where(hit_l, i[None, :], 0), 1) + tl.sum(tl.where(hit_q, qi[None, :], 0), 1)
        p = tl.sum(tl.where(hit_l, p[None, :], 0), 1) + tl.sum(tl.where(hit_q, qp[None, :], 0), 1)
        v = tl.where(in_list, v, float("-inf"))
        i = tl.where(in_list, i, WORST_ID)
        p = tl.where(in_list, p, WORST_ID)
    tl.store(ov_ptr + c * K + slots, v.to(ov_ptr.dtype.element_ty), mask=in_list)
    tl.store(oi_ptr + c * K + slots, i, mask=in_list)
    tl.store(op_ptr + c * K + slots, p, mask=in_list)
    tl.store(nan_ptr + c, tl.sum(nan_count, 0))


def channel_topk_update_triton(acts, ids, values, rids, rpos, out_values, out_ids, out_pos):
    """acts [B, C, HW] contiguous; lists [C, k]; writes out_* and returns per-channel NaN counts [C]."""
    B, C, HW = acts.shape
    k = values.shape[1]
    nan_counts = torch.empty(C, dtype=torch.int32, device=acts.device)
    _channel_topk_update_kernel[(C,)](
        acts, ids, values, rids, rpos, out_values, out_ids, out_pos, nan_counts, B, C, HW, k,
        WORST_ID=_WORST_ID, BLOCK_B=min(16, triton.next_power_of_2(B)),
        BLOCK_HW=min(256, triton.next_power_of_2(HW)), BLOCK_K=triton.next_power_of_2(k))
    return nan_counts
