"""Reference of ``perturb_by_rank``: the cumulative perturbation steps of pixel flipping."""
import torch


def perturb_by_rank_ref(x, ranks, step_begin, step_end, features_in_step, baseline):
    """``[B * S, C, H, W]`` with S = step_end - step_begin, image-major: copy ``b * S + i`` is
    ``x[b]`` with every feature of rank ``< (step_begin + i) * features_in_step`` replaced by
    ``baseline[b]``. ranks: int ``[B, H, W]`` (a pixel's channels go together) or
    ``[B, C, H, W]`` (one rank per element)."""
    steps = torch.arange(step_begin, step_end, device=x.device)
    r = ranks if ranks.dim() == 4 else ranks[:, None]
    removed = r[:, None] < (steps * features_in_step).view(1, -1, 1, 1, 1)  # [B, S, c, H, W]
    out = torch.where(removed, baseline[:, None], x[:, None])
    return out.reshape(-1, *x.shape[1:])
