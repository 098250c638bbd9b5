"""Request bodies of every route (pydantic). Unknown fields are ignored, as OpenAI's and TEI's clients may add
some; a field of the wrong type is a 400 (OpenAI routes) or 422 (the others) naming it."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, FiniteFloat, StrictInt

Inputs = str | list[str] | list[StrictInt] | list[list[StrictInt]]
Weights = tuple[FiniteFloat, FiniteFloat, FiniteFloat]
InputType = Literal["query", "passage", "raw"]
OutputName = Literal["dense", "sparse", "colbert"]
EncodingFormat = Literal["float", "base64"]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class OpenAIEmbeddingRequest(_Body):
    """``POST /v1/embeddings``: OpenAI's fields, plus tembed's ``input_type`` and ``truncate``."""

    input: Inputs
    model: str | None = None
    encoding_format: EncodingFormat = "float"
    dimensions: int | None = None
    user: str | None = None
    input_type: InputType | None = None
    truncate: bool = True


class EmbedRequest(_Body):
    """``POST /embed`` and ``POST /``: TEI's fields, plus ``input_type``."""

    inputs: Inputs
    truncate: bool | None = None
    truncation_direction: Literal["right", "left", "Right", "Left"] = "right"
    prompt_name: str | None = None
    normalize: bool = True
    dimensions: int | None = None
    input_type: InputType | None = None


class EmbedSparseRequest(_Body):
    """``POST /embed_sparse``: TEI's fields."""

    inputs: Inputs
    truncate: bool | None = None
    truncation_direction: Literal["right", "left", "Right", "Left"] = "right"
    prompt_name: str | None = None
    input_type: InputType | None = None


class EncodeRequest(_Body):
    """``POST /encode``: dense, sparse and ColBERT outputs from one forward pass."""

    inputs: Inputs
    input_type: InputType = "raw"
    outputs: list[OutputName] = Field(default_factory=lambda: list[OutputName](["dense"]))
    truncate: bool = True
    truncation_direction: Literal["right", "left", "Right", "Left"] = "right"
    max_length: int | None = None
    dimensions: int | None = None
    return_tokens: bool = False
    encoding_format: EncodingFormat = "float"


class ScoreRequest(_Body):
    """``POST /score``: ``pairs``, or one ``query`` with several ``texts``; FlagEmbedding's ``compute_score``."""

    pairs: list[tuple[str, str]] | None = None
    query: str | None = None
    texts: list[str] | None = None
    weights: Weights = (1.0, 1.0, 1.0)
    max_query_length: int | None = None
    max_passage_length: int | None = None


class RerankRequest(_Body):
    """``POST /rerank``: TEI's fields, plus M3 ``weights``."""

    query: str
    texts: list[str]
    return_text: bool = False
    truncate: bool | None = None
    raw_scores: bool = False
    weights: Weights | None = None


class TokenizeRequest(_Body):
    """``POST /tokenize``: TEI's fields."""

    inputs: str | list[str]
    add_special_tokens: bool = True
    prompt_name: str | None = None


class DecodeRequest(_Body):
    """``POST /decode``: TEI's fields."""

    ids: list[StrictInt] | list[list[StrictInt]]
    skip_special_tokens: bool = True
