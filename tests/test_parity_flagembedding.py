"""The FlagEmbedding facade against FlagEmbedding 1.4.2 itself, run in its own venv (transformers 4.57).

The reference venv is built by ``make reference-venv`` (``make test`` does it first). Without it these tests
skip, unless TEMBED_REQUIRE_REFERENCE=1 (set by ``make test``), in which case they fail.
"""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest

from tembed.compat.flagembedding import FlagAutoModel, FlagICLModel, FlagLLMModel, FlagModel

from realdata import insuranceqa_answers, sts_b_sentences

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE_PYTHON = os.path.join(ROOT, ".venv-ref", "bin", "python")
RUNNER = os.path.join(ROOT, "tests", "reference", "flagembedding_runner.py")
TOLERANCE = 1e-5
BGE_INSTRUCTION = "Represent this sentence for searching relevant passages: "
ICL_EXAMPLES = [
    {
        "instruct": "Given a web search query, retrieve relevant passages that answer the query.",
        "query": "what is a virtual interface",
        "response": "A virtual interface is a software-defined abstraction.",
    },
    {
        "instruct": "Given a web search query, retrieve relevant passages that answer the query.",
        "query": "causes of back pain in female for a week",
        "response": "Back pain in females can have many causes.",
    },
]


def _texts() -> dict[str, list[str]]:
    sentences = sts_b_sentences("test")[:500]
    answers = insuranceqa_answers()[:60]  # long texts: mixed lengths, some truncated at 512
    return {"mixed": sentences + answers, "queries": sentences[:40], "short": sentences[500 - 30 :]}


def _jobs(minilm: str, splade: str, decoders: dict[str, str]) -> list[dict]:
    texts = _texts()
    jobs = [
        {
            "name": "flag_mean",
            "class": "FlagModel",
            "model": minilm,
            "init": {"pooling_method": "mean"},
            "method": "encode",
            "texts": texts["mixed"],
        },
        {
            "name": "flag_queries",
            "class": "FlagModel",
            "model": minilm,
            "init": {"pooling_method": "mean", "query_instruction_for_retrieval": BGE_INSTRUCTION},
            "method": "encode_queries",
            "texts": texts["queries"],
        },
        {
            "name": "flag_corpus_instr",
            "class": "FlagModel",
            "model": minilm,
            "init": {"pooling_method": "mean", "passage_instruction_for_retrieval": "passage: "},
            "method": "encode_corpus",
            "texts": texts["short"],
        },
        {
            "name": "flag_trunc_dim",
            "class": "FlagModel",
            "model": minilm,
            "init": {"pooling_method": "mean", "truncate_dim": 64, "passage_max_length": 32},
            "method": "encode",
            "texts": texts["mixed"][450:],
        },
        {
            "name": "flag_cls",
            "class": "FlagModel",
            "model": splade,
            "init": {"pooling_method": "cls"},
            "method": "encode",
            "texts": texts["mixed"],
        },
        {
            "name": "flag_unnormalized",
            "class": "FlagModel",
            "model": splade,
            "init": {"pooling_method": "cls", "normalize_embeddings": False},
            "method": "encode",
            "args": {"max_length": 64},
            "texts": texts["short"],
        },
        {
            "name": "auto_class",
            "class": "FlagAutoModel",
            "model": minilm,
            "init": {"model_class": "encoder-only-base", "pooling_method": "mean"},
            "method": "encode",
            "texts": texts["short"],
        },
    ]
    for side, path in decoders.items():
        jobs += [
            {
                "name": f"llm_{side}_q",
                "class": "FlagLLMModel",
                "model": path,
                "init": {"query_instruction_for_retrieval": "Given a question, retrieve passages that answer it"},
                "method": "encode_queries",
                "texts": texts["queries"],
            },
            {
                "name": f"llm_{side}_c",
                "class": "FlagLLMModel",
                "model": path,
                "init": {},
                "method": "encode_corpus",
                "texts": texts["mixed"][400:],
            },
            {
                "name": f"icl_{side}_q",
                "class": "FlagICLModel",
                "model": path,
                "init": {
                    "query_instruction_for_retrieval": ICL_EXAMPLES[0]["instruct"],
                    "examples_for_task": ICL_EXAMPLES,
                },
                "method": "encode_queries",
                "args": {"max_length": 48},
                "texts": texts["queries"],
            },
            {
                "name": f"icl_{side}_c",
                "class": "FlagICLModel",
                "model": path,
                "init": {"examples_for_task": ICL_EXAMPLES},
                "method": "encode_corpus",
                "texts": texts["short"],
            },
        ]
    return jobs


@pytest.fixture(scope="module")
def reference(tmp_path_factory, minilm_path, splade_path, tiny_decoder_paths):
    if not os.path.exists(REFERENCE_PYTHON):
        if os.environ.get("TEMBED_REQUIRE_REFERENCE") == "1":
            pytest.fail(f"the FlagEmbedding reference venv is missing ({REFERENCE_PYTHON}); run `make reference-venv`")
        pytest.skip("FlagEmbedding reference venv not built (make reference-venv)")
    folder = tmp_path_factory.mktemp("flag-reference")
    jobs = _jobs(minilm_path, splade_path, tiny_decoder_paths)
    job_file, out_file = folder / "jobs.json", folder / "out.npz"
    job_file.write_text(json.dumps(jobs))
    result = subprocess.run([REFERENCE_PYTHON, RUNNER, str(job_file), str(out_file)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    with np.load(out_file) as data:
        return {job["name"]: (job, data[job["name"]]) for job in jobs}


_CLASSES = {"FlagModel": FlagModel, "FlagLLMModel": FlagLLMModel, "FlagICLModel": FlagICLModel}


def _ours(job: dict) -> np.ndarray:
    init = {"use_fp16": False, "devices": "cpu", **job["init"]}
    if job["class"] == "FlagAutoModel":
        model = FlagAutoModel.from_finetuned(job["model"], **init)
    else:
        model = _CLASSES[job["class"]](job["model"], **init)
    with model:
        return getattr(model, job["method"])(job["texts"], **job.get("args", {}))


@pytest.mark.parametrize(
    "name",
    ["flag_mean", "flag_queries", "flag_corpus_instr", "flag_trunc_dim", "flag_cls", "flag_unnormalized", "auto_class"]
    + [f"{kind}_{side}_{method}" for kind in ("llm", "icl") for side in ("left", "right") for method in "qc"],
)
def test_same_vectors_as_flagembedding(reference, name):
    job, expected = reference[name]
    ours = _ours(job)
    assert ours.dtype == np.float32
    assert ours.shape == expected.shape
    difference = np.abs(ours - expected).max()
    assert difference <= TOLERANCE, f"{name}: max abs difference {difference:.2e}"
