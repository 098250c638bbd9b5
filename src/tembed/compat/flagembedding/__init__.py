"""A drop-in for FlagEmbedding users: ``FlagModel``, ``FlagLLMModel``, ``FlagICLModel``, ``FlagAutoModel``.

Replace ``from FlagEmbedding import FlagModel`` with ``from tembed.compat.flagembedding import FlagModel``: the
constructor parameters, their defaults and the method names are FlagEmbedding 1.4.2's, and in fp32 on the CPU
the vectors are the same (max abs difference <= 1e-5, checked against FlagEmbedding itself in the tests).
Everything runs through tembed's one pipeline.

Deliberate differences from FlagEmbedding:

* ``devices=None`` means one device (the first GPU, else the CPU), not every visible GPU; a list of several
  devices starts a warm worker pool at construction (each worker loads the model; nothing is pickled) that
  stops with ``close()`` -- a worker failure reaches the caller instead of hanging.
* Outputs are float32 whatever the compute precision (FlagEmbedding returns float16 arrays on GPUs).
* ``use_fp16`` / ``use_bf16`` apply on GPUs; on the CPU the model runs in fp32, as in FlagEmbedding, but the model
  is not mutated between calls.
* The batch size is never probed with a throw-away forward pass; it shrinks only on a real out-of-memory error.
* Unknown keyword arguments raise ``TypeError`` instead of silently becoming attributes or tokenizer arguments
  (``pad_to_multiple_of`` is accepted and ignored: it changes padding, not the vectors).
* The model is placed on its device once; nothing is cleaned up in ``__del__`` (use ``close()`` or ``with``).
* ``cache_dir`` is where this model is looked for (and downloaded to, online); each model its own.
* tembed's own parameters (``passage_instruction_for_retrieval`` / ``passage_instruction_format``, and
  ``pooling_method`` of the last-token classes) come after FlagEmbedding's, keyword-only where FlagEmbedding's
  signature has no room for them.
"""

from tembed.compat.flagembedding.auto import EmbedderModelClass, FlagAutoModel
from tembed.compat.flagembedding.m3 import BGEM3FlagModel
from tembed.compat.flagembedding.models import FlagICLModel, FlagLLMModel, FlagModel

__all__ = [
    "BGEM3FlagModel",
    "EmbedderModelClass",
    "FlagAutoModel",
    "FlagICLModel",
    "FlagLLMModel",
    "FlagModel",
]
