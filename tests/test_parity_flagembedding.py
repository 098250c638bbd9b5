"""The FlagEmbedding facade against FlagEmbedding 1.4.2 itself, run in its own venv (transformers 4.57).

The reference venv is built by ``make reference-venv`` (``make test`` does it first). Without it these tests
skip, unless TEMBED_REQUIRE_REFERENCE=1 (set by ``make test``), in which case they fail.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess

import numpy as np
import pytest

from tembed.compat.flagembedding import BGEM3FlagModel, FlagAutoModel, FlagICLModel, FlagLLMModel, FlagModel

from realdata import insuranceqa_answers, sts_b_sentences

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE_PYTHON = os.path.join(ROOT, ".venv-ref", "bin", "python")
RUNNER = os.path.join(ROOT, "tests", "reference", "flagembedding_runner.py")
TOLERANCE = 1e-5
# FlagEmbedding's default batch of 256 pads the mixed texts' first batch (the 60 long answers and ~200 sentences) to
# 512 tokens, and runs that batch twice (its batch-size probe): ~2 minutes on 2 cores. Its vectors do not depend on
# the batch size (padding is masked), so the reference runs those jobs in batches of 32; tembed's call is unchanged.
REFERENCE_BATCH = {"batch_size": 32}
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


M3_QUERIES = ["What is BGE M3?", "Defination of BM25"]
M3_PASSAGES = [
    "BGE M3 is an embedding model supporting dense retrieval, lexical matching and multi-vector interaction.",
    "BM25 is a bag-of-words retrieval function that ranks a set of documents based on the query terms appearing "
    "in each document",
]
M3_ALL = {"return_dense": True, "return_sparse": True, "return_colbert_vecs": True}


def _m3_jobs(path: str) -> list[dict]:
    texts = M3_QUERIES + M3_PASSAGES + sts_b_sentences("test")[:40] + insuranceqa_answers()[200:210] + [""]
    pairs = [[q, p] for q in M3_QUERIES for p in M3_PASSAGES] + [
        [a, b] for a, b in zip(sts_b_sentences("dev")[:12], sts_b_sentences("dev")[1500:1512], strict=True)
    ]
    return [
        {
            "name": "m3_encode",
            "class": "BGEM3FlagModel",
            "model": path,
            "init": {},
            "method": "encode",
            "args": M3_ALL,
            "texts": texts,
        },
        {
            "name": "m3_queries",
            "class": "BGEM3FlagModel",
            "model": path,
            "init": {"query_instruction_for_retrieval": "Represent this for search: "},
            "method": "encode_queries",
            "args": {**M3_ALL, "max_length": 32},
            "texts": texts[:20],
        },
        {
            "name": "m3_score",
            "class": "BGEM3FlagModel",
            "model": path,
            "init": {},
            "method": "compute_score",
            "args": {"max_passage_length": 128, "weights_for_different_modes": [0.4, 0.2, 0.4]},
            "pairs": pairs,
        },
        {
            "name": "m3_score_default",
            "class": "BGEM3FlagModel",
            "model": path,
            "init": {},
            "method": "compute_score",
            "pairs": pairs,
        },
        {
            "name": "m3_lexical",
            "class": "BGEM3FlagModel",
            "model": path,
            "init": {},
            "method": "compute_lexical_matching_score",
            "texts": texts[:12],
            "passages": texts[12:30],
        },
        {
            "name": "m3_colbert",
            "class": "BGEM3FlagModel",
            "model": path,
            "init": {},
            "method": "colbert_score",
            "texts": texts[:12],
            "passages": texts[12:30],
        },
        {
            "name": "m3_auto",
            "class": "FlagAutoModel",
            "model": path,
            "init": {"model_class": "encoder-only-m3", "return_sparse": True},
            "method": "encode",
            "texts": texts[:8],
        },
    ]


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
            "reference_args": REFERENCE_BATCH,
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
            "reference_args": REFERENCE_BATCH,
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


def _require_reference_venv() -> None:
    if not os.path.exists(REFERENCE_PYTHON):
        if os.environ.get("TEMBED_REQUIRE_REFERENCE") == "1":
            pytest.fail(f"the FlagEmbedding reference venv is missing ({REFERENCE_PYTHON}); run `make reference-venv`")
        pytest.skip("FlagEmbedding reference venv not built (make reference-venv)")


# The runner, then the signature dump (:data:`_SIGNATURE_DUMP`) in the same process: FlagEmbedding is imported once.
_RUN_THEN_DUMP = """
import runpy, sys
code = runpy.run_path(sys.argv[1])["main"](sys.argv[1:4])
if code:
    sys.exit(code)
exec(sys.argv[4])
"""
_SIGNATURES_SEEN: dict[str, dict[str, list[list]]] = {}  # from the reference fixture's process, when it ran


@pytest.fixture(scope="module")
def reference(tmp_path_factory, minilm_path, splade_path, tiny_decoder_paths, tiny_m3_path):
    _require_reference_venv()
    folder = tmp_path_factory.mktemp("flag-reference")
    jobs = _jobs(minilm_path, splade_path, tiny_decoder_paths) + _m3_jobs(tiny_m3_path)
    job_file, out_file = folder / "jobs.json", folder / "out.npz"
    job_file.write_text(json.dumps(jobs))
    command = [REFERENCE_PYTHON, "-c", _RUN_THEN_DUMP, RUNNER, str(job_file), str(out_file), _SIGNATURE_DUMP]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    _SIGNATURES_SEEN["signatures"] = json.loads(result.stdout.strip().splitlines()[-1])
    with np.load(out_file) as data:
        outputs = {key: data[key] for key in data.files}
    return {job["name"]: (job, {k: v for k, v in outputs.items() if k.split("__")[0] == job["name"]}) for job in jobs}


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
    job, outputs = reference[name]
    expected = outputs[name]
    ours = _ours(job)
    assert ours.dtype == np.float32
    assert ours.shape == expected.shape
    difference = np.abs(ours - expected).max()
    print(f"[parity] {name}: max abs difference {difference:.2e}")
    assert difference <= TOLERANCE, f"{name}: max abs difference {difference:.2e}"


@pytest.fixture(scope="module")
def m3_model():
    """``m3_model(job)``: the job's model, loaded once for the module per (class, model, init), as the runner caches
    FlagEmbedding's. A tiny M3 loads in seconds, nearly all of it reading the XLM-R tokenizer; calls change no state."""
    loaded: dict[str, object] = {}

    def get(job: dict):
        init = {"use_fp16": False, "devices": "cpu", **job["init"]}
        key = json.dumps([job["class"], job["model"], init], sort_keys=True)
        if key not in loaded:
            if job["class"] == "FlagAutoModel":
                loaded[key] = FlagAutoModel.from_finetuned(job["model"], **init)
            else:
                loaded[key] = BGEM3FlagModel(job["model"], **init)
        return loaded[key]

    yield get
    for model in loaded.values():
        model.close()


def _check_m3_outputs(name: str, ours: dict, expected: dict, count: int) -> None:
    dense_difference = np.abs(ours["dense_vecs"] - expected[f"{name}__dense_vecs"]).max()
    print(f"[parity] {name} dense: max abs difference {dense_difference:.2e}")
    assert dense_difference <= TOLERANCE
    reference_weights = json.loads(str(expected[f"{name}__lexical_weights"][0]))
    assert len(ours["lexical_weights"]) == len(reference_weights) == count
    sparse_difference = colbert_difference = 0.0
    for index, (mine, theirs) in enumerate(zip(ours["lexical_weights"], reference_weights, strict=True)):
        assert set(mine) == set(theirs), f"{name}[{index}]: token ids differ"
        assert all(isinstance(key, str) and isinstance(value, float) for key, value in mine.items())
        sparse_difference = max(sparse_difference, *(abs(mine[k] - v) for k, v in theirs.items()), 0.0)
    for index, matrix in enumerate(ours["colbert_vecs"]):
        theirs = expected[f"{name}__colbert_vecs__{index}"]
        assert matrix.shape == theirs.shape, f"{name}[{index}]: {matrix.shape} != {theirs.shape}"
        colbert_difference = max(colbert_difference, float(np.abs(matrix - theirs).max(initial=0.0)))
    print(f"[parity] {name} sparse: {sparse_difference:.2e}, colbert: {colbert_difference:.2e}")
    assert sparse_difference <= TOLERANCE and colbert_difference <= TOLERANCE


@pytest.mark.parametrize("name", ["m3_encode", "m3_queries", "m3_auto"])
def test_m3_outputs_same_as_flagembedding(reference, m3_model, name):
    job, expected = reference[name]
    ours = getattr(m3_model(job), job["method"])(job["texts"], **job.get("args", {}))
    if name == "m3_auto":  # FlagAutoModel picked BGEM3FlagModel; its return_sparse default applied
        assert ours["colbert_vecs"] is None and f"{name}__colbert_vecs__0" not in expected
        ours = {**ours, "colbert_vecs": []}
    _check_m3_outputs(name, ours, expected, len(job["texts"]))


@pytest.mark.parametrize("name", ["m3_score", "m3_score_default"])
def test_m3_compute_score_same_as_flagembedding(reference, m3_model, name):
    job, expected = reference[name]
    ours = m3_model(job).compute_score([tuple(pair) for pair in job["pairs"]], **job.get("args", {}))
    for mode in ("colbert", "sparse", "dense", "sparse+dense", "colbert+sparse+dense"):
        difference = np.abs(np.array(ours[mode]) - expected[f"{name}__{mode}"]).max()
        print(f"[parity] {name} {mode}: max abs difference {difference:.2e}")
        assert difference <= TOLERANCE, f"{name} {mode}: max abs difference {difference:.2e}"


@pytest.mark.parametrize("name", ["m3_lexical", "m3_colbert"])
def test_m3_pairwise_scores_same_as_flagembedding(reference, m3_model, name):
    job, expected = reference[name]
    model = m3_model(job)
    if name == "m3_lexical":
        left = model.encode(job["texts"], return_dense=False, return_sparse=True)["lexical_weights"]
        right = model.encode(job["passages"], return_dense=False, return_sparse=True)["lexical_weights"]
        ours = model.compute_lexical_matching_score(left, right)
    else:
        left = model.encode(job["texts"], return_dense=False, return_colbert_vecs=True)["colbert_vecs"]
        right = model.encode(job["passages"], return_dense=False, return_colbert_vecs=True)["colbert_vecs"]
        ours = np.array([[float(model.colbert_score(q, p)) for p in right] for q in left])
    difference = np.abs(ours - expected[name]).max()
    print(f"[parity] {name}: max abs difference {difference:.2e}")
    assert difference <= TOLERANCE


# ------------------------------------------------------------------------------------- signatures and arguments
_SIGNATURE_DUMP = """
import inspect, json, sys
import FlagEmbedding

def params(function):
    return [
        [p.name, p.kind.name, None if p.default is p.empty else repr(p.default)]
        for p in inspect.signature(function).parameters.values() if p.name not in ("self", "cls")
    ]

names = ["FlagModel", "FlagLLMModel", "FlagICLModel", "BGEM3FlagModel"]
dump = {name: params(getattr(FlagEmbedding, name).__init__) for name in names}
dump["FlagAutoModel"] = params(FlagEmbedding.FlagAutoModel.from_finetuned)
json.dump(dump, sys.stdout)
"""


@pytest.fixture(scope="module")
def reference_signatures() -> dict[str, list[list]]:
    _require_reference_venv()
    if "signatures" in _SIGNATURES_SEEN:  # the reference fixture's FlagEmbedding process dumped them already
        return _SIGNATURES_SEEN["signatures"]
    result = subprocess.run([REFERENCE_PYTHON, "-c", _SIGNATURE_DUMP], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "cls", [FlagModel, FlagLLMModel, FlagICLModel, BGEM3FlagModel, FlagAutoModel], ids=lambda cls: cls.__name__
)
def test_same_positional_parameters_as_flagembedding(reference_signatures, cls):
    """FlagEmbedding's positional order, names and defaults (None: the class's own default); tembed's extras
    come after them, and no parameter can be given twice."""
    theirs = reference_signatures[cls.__name__]
    function = cls.from_finetuned if cls is FlagAutoModel else cls.__init__
    ours = [p for p in inspect.signature(function).parameters.values() if p.name not in ("self", "cls")]
    positional = [p.name for p in ours if p.kind is p.POSITIONAL_OR_KEYWORD]
    their_positional = [name for name, kind, _ in theirs if kind == "POSITIONAL_OR_KEYWORD"]
    assert positional[: len(their_positional)] == their_positional
    defaults = {p.name: p.default for p in ours}
    for name, _, default in theirs:
        if default is not None and name in defaults and defaults[name] is not None:
            assert repr(defaults[name]) == default, f"{cls.__name__}({name}=...): {defaults[name]!r} != {default}"


def test_llm_model_takes_flagembedding_positional_arguments(tiny_decoder_paths):
    """Past ``devices`` come FlagEmbedding's ``trust_remote_code``, ``cache_dir``, ``batch_size``...; the
    tembed-only ``pooling_method`` is keyword-only, so it cannot be passed twice."""
    path = tiny_decoder_paths["left"]
    with FlagLLMModel(path, True, False, False, "Find it", None, "cpu", False, None, 8, 48, 96) as model:
        assert (model.batch_size, model.query_max_length, model.passage_max_length) == (8, 48, 96)
        assert model.pooling_method == "last_token"
        assert model.query_instruction_format == "Instruct: {}\nQuery: {}"
    with FlagICLModel(path, True, False, False, None, None, "\n<answer>", "cpu", batch_size=5) as model:
        assert (model.suffix, model.batch_size, model.target_devices) == ("\n<answer>", 5, ["cpu"])
    with pytest.raises(ValueError, match="last token"):
        FlagLLMModel(path, devices="cpu", pooling_method="mean")


def test_subclasses_forward_every_shared_parameter(tiny_decoder_paths, tiny_m3_path):
    shared = dict(
        normalize_embeddings=False,
        query_instruction_for_retrieval="Q",
        query_instruction_format="{}: {}",
        devices="cpu",
        batch_size=3,
        query_max_length=40,
        passage_max_length=50,
        truncate_dim=16,
        passage_instruction_for_retrieval="P",
        passage_instruction_format="{} {}",
    )
    for cls, path in ((FlagLLMModel, tiny_decoder_paths["left"]), (FlagICLModel, tiny_decoder_paths["left"])):
        with cls(path, use_fp16=False, convert_to_numpy=False, **shared) as model:
            assert {name: getattr(model, name) for name in shared if name != "devices"} == {
                name: value for name, value in shared.items() if name != "devices"
            }
            assert not model.convert_to_numpy and not model.embedder.normalize and model.embedder.truncate_dim == 16
            assert model.encode_corpus(["a passage"]).shape == (1, 16)
    with BGEM3FlagModel(tiny_m3_path, use_fp16=False, return_sparse=True, **shared) as model:
        assert (model.batch_size, model.passage_max_length, model.return_sparse) == (3, 50, True)
        assert model.passage_instruction_for_retrieval == "P" and model.embedder.truncate_dim == 16


def test_tokenizer_is_the_embedders(minilm_path):
    with FlagModel(minilm_path, devices="cpu", use_fp16=False) as model:
        assert model.tokenizer is model.embedder.tokenizer.hf


def _hub_cache_with(folder, cache_dir, repo_id: str) -> None:
    """A Hugging Face cache holding ``folder`` as ``repo_id`` (the layout huggingface_hub reads offline)."""
    import shutil

    repo = cache_dir / f"models--{repo_id.replace('/', '--')}"
    revision = "0" * 40
    shutil.copytree(folder, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)


def test_each_model_finds_its_own_cache_dir(minilm_path, tmp_path):
    first, second = tmp_path / "cache-a", tmp_path / "cache-b"
    _hub_cache_with(minilm_path, first, "org-a/minilm-copy")
    _hub_cache_with(minilm_path, second, "org-b/minilm-copy")
    texts = ["a cat sits on the mat", "stock prices fell sharply"]
    with FlagModel(minilm_path, devices="cpu") as local:
        expected = local.encode(texts)
    for cache, repo_id in ((first, "org-a/minilm-copy"), (second, "org-b/minilm-copy")):
        with FlagModel(repo_id, devices="cpu", cache_dir=str(cache)) as model:
            assert model.embedder.resolved.path.startswith(str(cache))  # each model its own cache, not the first's
            assert np.abs(model.encode(texts) - expected).max() <= 1e-6
