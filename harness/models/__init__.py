"""Model adapters behind one contract (:class:`harness.models.base.ModelAdapter`)."""

from harness.models.base import MODELS, ModelAdapter

__all__ = ["MODELS", "ModelAdapter"]
