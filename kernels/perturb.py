"""Triton kernel of ``perturb_by_rank``: one program per (copy, block of elements) selects each
element from the image or the baseline by its feature's rank."""
import triton
import triton.language as tl


@triton.jit
def _perturb_by_rank_kernel(x_ptr, ranks_ptr, base_ptr, out_ptr, S, E, F, HW, CHANNELS, STEP_BEGIN,
                            FEATURES_IN_STEP, PER_ELEMENT: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                            BLOCK: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)  # copy n = b * S + i
    b = n // S
    limit = (STEP_BEGIN + n % S) * FEATURES_IN_STEP
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < E
    if PER_ELEMENT:
        feature = offs
    elif CHANNELS_LAST:
        feature = offs // CHANNELS
    else:
        feature = offs % HW
    rank = tl.load(ranks_ptr + b * F + feature, mask=mask, other=0)
    removed = rank < limit
    v = tl.load(x_ptr + b * E + offs, mask=mask & ~removed, other=0.0)
    base = tl.load(base_ptr + b * E + offs, mask=mask & removed, other=0.0)
    tl.store(out_ptr + n * E + offs, tl.where(removed, base, v), mask=mask)


def perturb_by_rank_triton(x, ranks, step_begin, step_end, features_in_step, baseline, channels,
                           channels_last, out) -> None:
    """x, baseline [B, E]; ranks [B, F] int64; out [B * S, E] (written in place)."""
    B, E = x.shape
    S = step_end - step_begin
    block = min(1024, triton.next_power_of_2(E))
    grid = (B * S, triton.cdiv(E, block))
    _perturb_by_rank_kernel[grid](x, ranks, baseline, out, S, E, ranks.shape[1], E // channels, channels,
                                  step_begin, features_in_step, PER_ELEMENT=ranks.shape[1] == E,
                                  CHANNELS_LAST=channels_last, BLOCK=block)
