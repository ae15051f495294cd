"""Reference of the DeepLIFT rescale rule on ReLU over a stacked [inputs; references] batch."""
import torch
import torch.nn.functional as F


def deeplift_rescale_relu_grad_ref(grad: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """``grad * factor`` for ReLU inputs ``x`` [2N, ...] = [inputs; references], ``grad`` [2N, ...].

    ``factor`` is the rescale multiplier ``(relu(x_in) - relu(x_ref)) / (x_in - x_ref)`` on both
    halves, or each half's plain ReLU derivative ``x > 0`` where ``|x_in - x_ref| < eps``
    (Captum's ``nonlinear`` rule, ``captum/attr/_core/deep_lift.py``)."""
    x_in, x_ref = x.chunk(2)
    o_in, o_ref = F.relu(x).chunk(2)
    d_in = x_in - x_ref
    fallback = d_in.abs() < eps
    ratio = (o_in - o_ref) / d_in
    factor = torch.cat([torch.where(fallback, (x_in > 0).to(x.dtype), ratio),
                        torch.where(fallback, (x_ref > 0).to(x.dtype), ratio)])
    return grad * factor
