"""Backends run the Transformer forward pass: token batches in, last hidden states out.

Every backend has the same small interface (:class:`tembed.backends.base.Backend`), so the pipeline around it
(tokenize, schedule, heads, finish) is shared.
"""

from tembed.backends.base import Backend, BackendOutput, TokenBatch
from tembed.backends.torch_backend import TorchBackend

__all__ = ["Backend", "BackendOutput", "TokenBatch", "TorchBackend"]
