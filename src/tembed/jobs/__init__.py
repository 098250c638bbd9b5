"""Jobs: long-running work over a corpus, as plain typed code (no command-line parsing).

* :mod:`tembed.jobs.corpus`: :class:`~tembed.jobs.corpus.CorpusJob`, a corpus file to parquet / npy, checkpointed
  per chunk and resumable, through any :class:`~tembed.encoder.Encoder` (one device or a worker pool);
* :mod:`tembed.jobs.plan`: what comes before it: the request checked, the output locked, the partial run found
  and checked, the model's record;
* :mod:`tembed.jobs.records`: ids (duplicates), chunking by count and output bytes;
* :mod:`tembed.jobs.retry`: a failing chunk encoded again by halves;
* :mod:`tembed.jobs.errors`: how a job stops (:class:`~tembed.jobs.errors.JobError`, exit codes) and its messages.

``tembed encode`` (:mod:`tembed.cli.encode`) parses its options into these and runs the job.
"""

DEFAULT_CHUNK_SIZE = 2048
"""Records per chunk: per output row group and per checkpoint (``tembed encode --chunk-size``)."""
