"""Drop-in facades for users of other libraries (``tembed.compat.flagembedding``)."""
