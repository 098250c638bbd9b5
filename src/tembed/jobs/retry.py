"""A chunk that fails to encode, encoded again by halves down to the single texts that fail (``--skip-invalid``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from tembed.io.readers import Record
from tembed.jobs.errors import error_text
from tembed.outputs import EncodeOutputs

EncodeTexts = Callable[[Sequence[str]], EncodeOutputs]
"""Encodes a list of texts with the job's options."""


class NotTheTexts(Exception):
    """Encoding fails whatever the texts: the run must stop, not reject every record."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


class _Bisection:
    """The state of one retry: the records encoded, their outputs, and the texts that fail alone."""

    def __init__(self, encode: EncodeTexts, chunk_error: BaseException) -> None:
        self.encode = encode
        self.chunk_error = chunk_error
        self.done: list[Record] = []
        self.results: list[EncodeOutputs] = []
        self.failures: list[tuple[Record, BaseException]] = []

    def attempt(self, part: list[Record], known_error: BaseException | None = None) -> None:
        if known_error is None:
            try:
                self.results.append(self.encode([r.text for r in part]))
                self.done.extend(part)
                return
            except Exception as error:
                known_error = error
        if len(part) == 1:
            self.failures.append((part[0], known_error))
            self._check_it_is_the_texts()
            return
        middle = len(part) // 2
        self.attempt(part[:middle])
        self.attempt(part[middle:])

    def _check_it_is_the_texts(self) -> None:
        """Two texts fail alone as the whole chunk did, and none succeeded: the fault is not in the texts (a broken
        device, a closed model). Rejecting every record would hide it."""
        failures = self.failures
        if self.done or len(failures) != 2:
            return
        if all(error_text(error) == error_text(self.chunk_error) for _, error in failures):
            raise NotTheTexts(self.chunk_error)


def encode_by_halves(
    encode: EncodeTexts, records: list[Record], error: BaseException
) -> tuple[list[Record], EncodeOutputs | None, list[tuple[Record, BaseException]]]:
    """Encode records whose chunk failed as a whole (with ``error``): by halves, down to the single texts that fail.

    Returns the records encoded, their outputs (one :class:`~tembed.outputs.EncodeOutputs`, in their order; None
    when none was encoded) and ``(record, error)`` for each text that fails on its own. Costs about twice the
    chunk's encoding per failing text.

    Raises:
        NotTheTexts: the first two texts tried alone fail as the chunk did and none succeeded.
    """
    bisection = _Bisection(encode, error)
    bisection.attempt(records, known_error=error)
    results = bisection.results
    result = results[0] if len(results) == 1 else EncodeOutputs.concatenate(results) if results else None
    return bisection.done, result, bisection.failures
