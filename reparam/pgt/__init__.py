"""PowerGrad Transform (PGT): replace ``p`` by ``p**alpha / sum p**alpha`` in the
cross-entropy gradient, i.e. send ``softmax(alpha * z) - q`` back instead of ``softmax(z) - q``.

* :class:`PowerGradCrossEntropy` / :func:`power_grad_cross_entropy`: the loss (forward = CE),
* :func:`power_grad_logits` / :class:`PowerGradLogits`: identity on logits, PGT in backward,
* :func:`adaptive_grad_clip_`: unit-wise adaptive gradient clipping,
* :mod:`reparam.pgt.theory`: threshold, transform and gradient bounds of the paper.
"""
from .agc import adaptive_grad_clip_, unitwise_norm
from .logits import PowerGradLogits, power_grad_logits
from .loss import PowerGradCrossEntropy, power_grad_cross_entropy
from .theory import logit_gradient_bounds, pgt_logit_gradient, power_transform, stationary_threshold

__all__ = [
    "PowerGradCrossEntropy",
    "power_grad_cross_entropy",
    "PowerGradLogits",
    "power_grad_logits",
    "adaptive_grad_clip_",
    "unitwise_norm",
    "power_transform",
    "stationary_threshold",
    "pgt_logit_gradient",
    "logit_gradient_bounds",
]
