"""Fused linear projection + sparse softmax cross-entropy that never holds the N x V logits
(TensorFlow): ``linear_cross_entropy`` and ``linear_logits``. docs/linear_head.md has the design."""

from fused_xent import _registration
from fused_xent._tf.linear import linear_cross_entropy, linear_logits

__all__ = ["linear_cross_entropy", "linear_logits"]

_registration.register(finishing=__name__)  # this module may have been the first import of a framework
