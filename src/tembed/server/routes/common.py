"""What the route modules share: the service of the app, and the role of a request."""

from __future__ import annotations

from fastapi import Request

from tembed.server.errors import ApiError
from tembed.server.service import EmbeddingService
from tembed.types import Role

_ROLES = {None: Role.PLAIN, "raw": Role.PLAIN, "query": Role.QUERY, "passage": Role.PASSAGE}


def service_of(request: Request) -> EmbeddingService:
    """The app's :class:`~tembed.server.service.EmbeddingService`."""
    service: EmbeddingService = request.app.state.service
    return service


def role_for(input_type: str | None, prompt_name: str | None = None) -> Role:
    """``input_type`` (``query`` applies the registry's query instruction, as ``encode_queries`` does; ``passage``
    the passage one; ``raw`` none), or TEI's ``prompt_name`` when it is ``query`` / ``passage``.

    Raises:
        ApiError: an unknown ``prompt_name``, or one that contradicts ``input_type``.
    """
    role = _ROLES[input_type]
    if prompt_name is None:
        return role
    named = _ROLES.get(prompt_name.lower())
    if named is None or named is Role.PLAIN:
        raise ApiError(
            "Validation",
            f"prompt_name {prompt_name!r} is unknown; this server's prompts are 'query' "
            "and 'passage' (the model's instructions)",
            param="prompt_name",
        )
    if input_type is not None and named is not role:
        raise ApiError(
            "Validation", f"prompt_name {prompt_name!r} contradicts input_type {input_type!r}", param="prompt_name"
        )
    return named


def check_truncation_direction(direction: str) -> None:
    """Only right truncation (the library's) is served."""
    if direction.lower() != "right":
        raise ApiError(
            "Validation",
            "truncation_direction 'left' is not supported; texts are truncated on the right, as the library does",
            param="truncation_direction",
        )
