"""``tembed eval``: retrieval metrics equal to pytrec_eval's on sentence-transformers' vectors, quantized and M3
searches equal to a brute-force ranking computed here, STS-B's published Spearman, and bad data refused.

The BEIR folder is real InsuranceQA v2 data (valid split: 30 questions, the corpus their positives and first 3
negatives each), written by examples/insuranceqa_to_beir.py.
"""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from tembed.cli import app
from tembed.cli import eval as cli_eval

from realdata import sts_b

K_VALUES = (1, 3, 5, 10, 100, 1000)
CUTS = ",".join(str(k) for k in K_VALUES)
MEASURES = {"ndcg_at": "ndcg_cut", "map_at": "map_cut", "recall_at": "recall", "precision_at": "P"}
HERE = os.path.dirname(os.path.abspath(__file__))


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def iqa(tmp_path_factory) -> str:
    spec = importlib.util.spec_from_file_location(
        "iqa_beir", os.path.join(HERE, "..", "examples", "insuranceqa_to_beir.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    folder = str(tmp_path_factory.mktemp("iqa"))
    counts = module.convert(folder, ["valid"], max_queries=30, pool_only=True, negatives=3)
    assert counts["valid_queries"] == 30 and counts["corpus"] > 120
    return folder


@pytest.fixture(scope="module")
def minilm_run(iqa, minilm, minilm_path, tmp_path_factory):
    """tembed.eval.retrieval of all-MiniLM-L6-v2 on the folder: (the corpus embeddings it wrote, its report)."""
    import tembed.eval

    corpus = str(tmp_path_factory.mktemp("minilm-run") / "corpus.parquet")
    report = tembed.eval.retrieval(iqa, minilm_path, split="valid", encoder=minilm.encoder, corpus_embeddings=corpus)
    return corpus, report


def read_beir(folder: str, split: str = "valid"):
    """The folder read independently of tembed: corpus ids and texts (title + text as BEIR joins them)."""
    with open(os.path.join(folder, "corpus.jsonl"), encoding="utf-8") as handle:
        docs = [json.loads(line) for line in handle]
    doc_ids = [d["_id"] for d in docs]
    doc_texts = [(d["title"] + " " + d["text"]).strip() if d.get("title") else d["text"] for d in docs]
    with open(os.path.join(folder, "qrels", f"{split}.tsv"), encoding="utf-8") as handle:
        rows = list(csv.reader(handle, delimiter="\t"))[1:]
    qrels: dict[str, dict[str, int]] = {}
    for query_id, doc_id, score in rows:
        qrels.setdefault(query_id, {})[doc_id] = int(score)
    with open(os.path.join(folder, "queries.jsonl"), encoding="utf-8") as handle:
        queries = [json.loads(line) for line in handle]
    queries = [q for q in queries if q["_id"] in qrels]
    return doc_ids, doc_texts, [q["_id"] for q in queries], [q["text"] for q in queries], qrels


def pytrec_metrics(qrels, run: dict[str, dict[str, float]]) -> dict[str, float]:
    """MTEB's averages computed with pytrec_eval directly from a run of real scores; MRR@k on the run cut after k
    documents in trec_eval's order (score, then document id, descending)."""
    import pytrec_eval

    evaluator = pytrec_eval.RelevanceEvaluator(qrels, {f"{m}.{CUTS}" for m in MEASURES.values()})
    scores = evaluator.evaluate(run)
    expected = {
        f"{name}_{k}": np.mean([s[f"{measure}_{k}"] for s in scores.values()])
        for name, measure in MEASURES.items()
        for k in K_VALUES
    }
    for k in K_VALUES:
        cut = {
            q: dict(sorted(docs.items(), key=lambda item: (item[1], item[0]), reverse=True)[:k])
            for q, docs in run.items()
        }
        reciprocal = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(cut)
        expected[f"mrr_at_{k}"] = np.mean([s["recip_rank"] for s in reciprocal.values()])
    return expected


def run_from(scores: np.ndarray, query_ids, doc_ids) -> dict[str, dict[str, float]]:
    """Every document with its score, for every query (the corpora here are below the depth of 1,000)."""
    return {q: {d: float(scores[i, j]) for j, d in enumerate(doc_ids)} for i, q in enumerate(query_ids)}


def assert_same_metrics(ours: dict[str, float], expected: dict[str, float]) -> None:
    assert set(ours) == set(expected)
    for name, value in expected.items():
        assert ours[name] == pytest.approx(value, abs=1e-12), name


class SharedEncoder:
    """An open encoder the CLI may 'close' without closing it."""

    def __init__(self, encoder) -> None:
        self.encoder = encoder
        self.settings = encoder.settings

    def encode(self, texts, options):
        return self.encoder.encode(texts, options)

    def encode_stream(self, *args, **kwargs):
        return self.encoder.encode_stream(*args, **kwargs)

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def st_minilm(minilm_path):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(minilm_path, device="cpu")


@pytest.fixture(scope="module")
def m3_encoder(tiny_m3_path):
    """The tiny random BGE-M3 with all three outputs (each mode asks for the ones it needs), torch."""
    from tembed.encoder import open_encoder
    from tembed.settings import EmbedderConfig

    encoder = open_encoder(EmbedderConfig(tiny_m3_path, backend="torch", outputs=("dense", "sparse", "colbert")), "cpu")
    yield encoder
    encoder.close()


@pytest.fixture
def cli_on(monkeypatch):
    def use(encoder):
        monkeypatch.setattr(cli_eval, "open_eval_encoder", lambda config, device: SharedEncoder(encoder))

    return use


# ------------------------------------------------------------------------------------------------ retrieval
def test_metrics_equal_pytrec_eval_on_sentence_transformers_vectors(iqa, st_minilm, minilm_run):
    doc_ids, doc_texts, query_ids, query_texts, qrels = read_beir(iqa)
    st = st_minilm
    docs = st.encode(doc_texts, normalize_embeddings=True, convert_to_numpy=True)
    queries = st.encode(query_texts, normalize_embeddings=True, convert_to_numpy=True)
    expected = pytrec_metrics(qrels, run_from(queries @ docs.T, query_ids, doc_ids))

    corpus, report = minilm_run
    print({k: round(v, 4) for k, v in report.metrics.items() if k.endswith("_at_10")})
    assert_same_metrics(report.metrics, expected)
    assert report.data["queries_evaluated"] == 30 and report.data["corpus_rows"] == len(doc_ids)
    assert report.model["pooling"] == "mean" and report.memory["dense_bytes_per_vector"] == 384 * 4
    assert pq.read_table(corpus, columns=["id"]).column("id").to_pylist() == doc_ids


def test_cli_reuses_the_corpus_and_searches_quantized_vectors(iqa, minilm, minilm_path, minilm_run, tmp_path, cli_on):
    from sentence_transformers.util.quantization import quantize_embeddings

    corpus, library = minilm_run
    cli_on(minilm.encoder)
    runner = CliRunner()
    base = ["eval", "retrieval", iqa, "--split", "valid", "--model", minilm_path, "--corpus-embeddings", corpus]
    result = runner.invoke(app, [*base, "-o", str(tmp_path / "fp32.json")])
    assert result.exit_code == 0, result.output
    assert "reusing the corpus embeddings" in result.output and "ndcg" in result.output
    saved = json.loads((tmp_path / "fp32.json").read_text())
    assert saved["metrics"] == library.metrics and saved["timings"]["load"] >= 0

    doc_ids, _, query_ids, query_texts, qrels = read_beir(iqa)
    docs = np.stack(pq.read_table(corpus, columns=["dense"]).column("dense").to_numpy(zero_copy_only=False))
    queries = minilm.encode_queries(query_texts)
    # ubinary rescored: every document is a candidate (4 x 1000 > corpus), scored by the float query against its
    # 0 / 1 bits (sentence-transformers' rescore); int8 on ranges calibrated on the corpus: the codes' dot product
    doc_bits = quantize_embeddings(docs, "ubinary")
    rescored = queries.astype(np.float64) @ np.unpackbits(doc_bits, axis=-1)[:, :384].T.astype(np.float64)
    binary_expected = pytrec_metrics(qrels, run_from(rescored, query_ids, doc_ids))
    doc_codes = quantize_embeddings(docs, "int8", calibration_embeddings=docs).astype(np.int64)
    query_codes = quantize_embeddings(queries, "int8", calibration_embeddings=docs).astype(np.int64)
    int8_expected = pytrec_metrics(qrels, run_from(query_codes @ doc_codes.T, query_ids, doc_ids))

    for flags, expected in (
        (["--quantize", "ubinary", "--rescore"], binary_expected),
        (["--quantize", "int8"], int8_expected),
    ):
        out = tmp_path / f"{flags[1]}.json"
        result = runner.invoke(app, [*base, *flags, "-o", str(out)])
        assert result.exit_code == 0, result.output
        report = json.loads(out.read_text())
        assert_same_metrics(report["metrics"], expected)
        assert report["memory"]["dense_bytes_per_vector"] == {"ubinary": 48, "int8": 384}[flags[1]]
    assert binary_expected["ndcg_at_10"] < library.metrics["ndcg_at_10"] + 0.05  # sanity: not better by chance


@pytest.mark.parametrize(
    ("model", "mode"),
    [("tiny_m3_path", "sparse"), ("tiny_m3_path", "colbert"), ("tiny_m3_path", "hybrid"), ("splade_path", "sparse")],
)
def test_m3_and_splade_modes_equal_a_brute_force_ranking(iqa, tmp_path_factory, request, model, mode):
    import tembed.eval
    from tembed.encoder import open_encoder
    from tembed.scoring import colbert_scores, lexical_scores
    from tembed.settings import EmbedderConfig, EncodeOptions

    path = request.getfixturevalue(model)
    folder = _small_folder(iqa, tmp_path_factory, docs=40)
    doc_ids, _, query_ids, query_texts, qrels = read_beir(folder)
    with contextlib.ExitStack() as held:
        if model == "tiny_m3_path":
            encoder = request.getfixturevalue("m3_encoder")
        else:
            encoder = open_encoder(EmbedderConfig(path, backend="torch", outputs=("sparse",)), "cpu")
            held.callback(encoder.close)
        corpus = str(folder) + f"-{mode}.parquet"
        report = tembed.eval.retrieval(
            folder, path, split="valid", mode=mode, encoder=encoder, corpus_embeddings=corpus,
            rerank_top_k=5, block_rows=7, passage_max_length=64,
        )  # fmt: skip
        queries = encoder.encode(query_texts, EncodeOptions(role="query", outputs=report_outputs(mode)))
    docs = _parquet_outputs(pq.read_table(corpus))
    if mode == "sparse":  # only documents sharing a token with the query are retrieved
        sparse = lexical_scores(queries.sparse, docs["sparse"])
        expected = {
            q: {d: float(sparse[i, j]) for j, d in enumerate(doc_ids) if sparse[i, j] > 0}
            for i, q in enumerate(query_ids)
        }
    else:  # the first 5 by the first stage reranked; the rest below them, in first-stage order
        dense = queries.dense.astype(np.float64) @ docs["dense"].T.astype(np.float64)
        colbert = colbert_scores(queries.colbert, docs["colbert"])
        if mode == "colbert":
            first, final = dense, colbert
        else:
            sparse = lexical_scores(queries.sparse, docs["sparse"])
            first, final = (0.4 * dense + 0.2 * sparse) / 0.6, 0.4 * dense + 0.2 * sparse + 0.4 * colbert
        expected = {}
        for i, q in enumerate(query_ids):
            order = np.argsort(-first[i], kind="stable")
            head, tail = order[:5], order[5:]
            shift = first[i, tail].max() - final[i, head].min() + 1
            expected[q] = {doc_ids[j]: float(final[i, j]) for j in head}
            expected[q].update({doc_ids[j]: float(first[i, j] - shift) for j in tail})
    assert_same_metrics(report.metrics, pytrec_metrics(qrels, expected))
    assert report.options["mode"] == mode


def report_outputs(mode: str) -> tuple[str, ...]:
    return {"sparse": ("sparse",), "colbert": ("dense", "colbert"), "hybrid": ("dense", "sparse", "colbert")}[mode]


def _parquet_outputs(table) -> dict:
    out = {}
    if "dense" in table.column_names:
        out["dense"] = np.stack(table.column("dense").to_numpy(zero_copy_only=False))
    if "sparse_ids" in table.column_names:
        ids, weights = table.column("sparse_ids").to_pylist(), table.column("sparse_weights").to_pylist()
        out["sparse"] = [dict(zip(i, w, strict=True)) for i, w in zip(ids, weights, strict=True)]
    if "colbert" in table.column_names:
        out["colbert"] = [
            np.asarray(m, dtype=np.float32).reshape(len(m), -1) for m in table.column("colbert").to_pylist()
        ]
    return out


def _small_folder(iqa, tmp_path_factory, docs: int):
    """The first ``docs`` corpus lines and the queries judged on them (qrels restricted to them)."""
    folder = tmp_path_factory.mktemp("small")
    with open(os.path.join(iqa, "corpus.jsonl"), encoding="utf-8") as handle:
        lines = handle.readlines()[:docs]
    (folder / "corpus.jsonl").write_text("".join(lines), encoding="utf-8")
    kept = {json.loads(line)["_id"] for line in lines}
    (folder / "qrels").mkdir()
    with open(os.path.join(iqa, "qrels", "valid.tsv"), encoding="utf-8") as handle:
        rows = [r for r in handle.read().splitlines()[1:] if r.split("\t")[1] in kept]
    (folder / "qrels" / "valid.tsv").write_text("query-id\tcorpus-id\tscore\n" + "\n".join(rows) + "\n")
    with open(os.path.join(iqa, "queries.jsonl"), encoding="utf-8") as handle:
        (folder / "queries.jsonl").write_text(handle.read())
    assert len({r.split("\t")[0] for r in rows}) >= 3
    return str(folder)


# ------------------------------------------------------------------------------------------------ STS
PUBLISHED_STSB_SPEARMAN = 82.03  # MTEB STSBenchmark test, all-MiniLM-L6-v2 (cosine Spearman x 100)


def test_sts_builtin_stsb_gives_the_published_spearman(minilm, minilm_path, tmp_path, cli_on):
    cli_on(minilm.encoder)
    out = tmp_path / "sts.json"
    result = CliRunner().invoke(app, ["eval", "sts", "--builtin", "stsb", "--model", minilm_path, "-o", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    print(f"[eval sts] STS-B test: {report['metrics']}")
    assert round(report["metrics"]["cosine_spearman"], 2) == PUBLISHED_STSB_SPEARMAN
    assert report["data"]["pairs"] == 1379 and report["options"]["role"] == "plain"
    assert "cosine_spearman" in result.output


@pytest.fixture(scope="module")
def sts_dev_reference(st_minilm):
    """60 STS-B dev pairs and scipy's Spearman / Pearson (x 100) of sentence-transformers' cosines on them."""
    from scipy.stats import pearsonr, spearmanr

    pairs = sts_b("dev")[:60]
    first = st_minilm.encode([a for a, _, _ in pairs], normalize_embeddings=True)
    second = st_minilm.encode([b for _, b, _ in pairs], normalize_embeddings=True)
    cosines = np.sum(first * second, axis=1)
    gold = [s for _, _, s in pairs]
    return pairs, 100 * spearmanr(gold, cosines).statistic, 100 * pearsonr(gold, cosines).statistic


@pytest.mark.parametrize("suffix", [".tsv", ".csv", ".jsonl"])
def test_sts_file_equals_scipy_on_sentence_transformers_vectors(
    minilm, minilm_path, sts_dev_reference, tmp_path, suffix
):
    import tembed.eval

    pairs, spearman, pearson = sts_dev_reference
    path = tmp_path / f"pairs{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps({"sentence1": a, "sentence2": b, "score": s}) + "\n" for a, b, s in pairs))
    else:
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle, delimiter="\t" if suffix == ".tsv" else ",")
            writer.writerow(["genre", "sentence1", "sentence2", "score"])
            writer.writerows(["x", a, b, s] for a, b, s in pairs)
    report = tembed.eval.sts(str(path), minilm_path, encoder=minilm.encoder)
    assert report.data["pairs"] == 60
    assert report.metrics["cosine_spearman"] == pytest.approx(spearman, abs=1e-3)
    assert report.metrics["cosine_pearson"] == pytest.approx(pearson, abs=1e-3)


# ------------------------------------------------------------------------------------------------ bad input
def _refuse_to_load(config, device):
    raise AssertionError("the model was loaded before the data was checked")


@pytest.mark.parametrize(
    "case",
    [
        "no-split",
        "bad-header",
        "bad-score",
        "fraction-score",
        "missing-query",
        "quantize-sparse",
        "bad-weights",
        "k-zero",
        "sts-missing-column",
        "sts-constant",
        "sts-not-finite",
    ],
)
def test_bad_data_and_options_are_refused_before_the_model_loads(iqa, tmp_path, monkeypatch, case):
    import shutil

    monkeypatch.setattr(cli_eval, "open_eval_encoder", _refuse_to_load)
    folder = tmp_path / "data"
    shutil.copytree(iqa, folder)
    qrels = folder / "qrels" / "valid.tsv"
    args = ["eval", "retrieval", str(folder), "--split", "valid"]
    expected = {
        "no-split": "test.tsv: no such file (splits here: valid)",
        "bad-header": "valid.tsv:1: the header must be",
        "bad-score": "valid.tsv:3: score 'high' is not a whole number",
        "fraction-score": "valid.tsv:3: score '0.5' is not a whole number",
        "k-zero": "k_values must be whole numbers >= 1, got [0, 10]",
        "sts-constant": "pairs.tsv: every gold score is 3.0: a correlation is undefined",
        "sts-not-finite": "pairs.tsv:3: field 'score' 'nan' is not a finite number",
        "missing-query": "1 judged queries are missing, e.g. ['valid-nope']",
        "quantize-sparse": "output quantization searches dense vectors",
        "bad-weights": "weights must be 3 non-negative numbers",
        "sts-missing-column": "pairs.tsv:1: the header has no score column",
    }[case]
    lines = qrels.read_text().splitlines()
    if case == "no-split":
        args = ["eval", "retrieval", str(folder)]
    elif case == "bad-header":
        qrels.write_text("\n".join(["qid\tdid\tscore", *lines[1:]]) + "\n")
    elif case in ("bad-score", "fraction-score"):
        score = "high" if case == "bad-score" else "0.5"
        qrels.write_text("\n".join([*lines[:2], lines[2].rsplit("\t", 1)[0] + "\t" + score, *lines[3:]]) + "\n")
    elif case == "k-zero":
        args += ["--k-values", "0,10"]
    elif case in ("sts-constant", "sts-not-finite"):
        second = "3" if case == "sts-constant" else "nan"
        (tmp_path / "pairs.tsv").write_text(f"sentence1\tsentence2\tscore\na\tb\t3\nc\td\t{second}\n")
        args = ["eval", "sts", str(tmp_path / "pairs.tsv")]
    elif case == "missing-query":
        qrels.write_text("\n".join([*lines, "valid-nope\t1\t1"]) + "\n")
    elif case == "quantize-sparse":
        args += ["--mode", "sparse", "--quantize", "int8"]
    elif case == "bad-weights":
        args += ["--mode", "hybrid", "--weights", "1,-1,0"]
    else:
        (tmp_path / "pairs.tsv").write_text("sentence1\tsentence2\tgold\na\tb\t1\n")
        args = ["eval", "sts", str(tmp_path / "pairs.tsv")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert expected in result.output


def test_corpus_embeddings_of_another_model_are_refused(iqa, minilm, minilm_run, cli_on):
    corpus, _ = minilm_run
    cli_on(minilm.encoder)
    args = ["eval", "retrieval", iqa, "--split", "valid", "--corpus-embeddings", corpus, "--model", "other-name"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "was encoded with other options: model" in result.output and "other-name" in result.output


def test_a_model_that_cannot_be_loaded_is_one_line_and_exit_2(tmp_path):
    result = CliRunner().invoke(app, ["eval", "sts", "--builtin", "stsb", "--model", str(tmp_path / "no-model")])
    assert result.exit_code == 2, result.output
    assert "error: cannot load" in result.output and "Traceback" not in result.output


def test_a_repeated_document_id_or_another_corpus_is_refused(iqa, minilm, minilm_run, tmp_path, cli_on):
    import shutil

    cli_on(minilm.encoder)
    folder = tmp_path / "dup"
    shutil.copytree(iqa, folder)
    lines = (folder / "corpus.jsonl").read_text().splitlines()
    (folder / "corpus.jsonl").write_text("\n".join([*lines[:3], lines[1], *lines[3:]]) + "\n")
    duplicated = json.loads(lines[1])["_id"]
    result = CliRunner().invoke(app, ["eval", "retrieval", str(folder), "--split", "valid", "-q"])
    assert result.exit_code != 0 and "line 4" in result.output and duplicated in result.output, result.output
    assert "rerun with --skip-invalid to leave such documents out" in result.output and "--resume" not in result.output

    corpus, _ = minilm_run  # encoded from the full folder: refused for a folder holding another corpus
    args = ["eval", "retrieval", str(folder), "--split", "valid", "--corpus-embeddings", corpus]
    result = CliRunner().invoke(app, [*args, "--model", cli_model(minilm)])
    assert result.exit_code == 2, result.output
    assert "was encoded from another corpus" in result.output


def cli_model(embedder) -> str:
    return embedder.settings_.model


def test_sts_tsv_keeps_quotes_as_text_and_a_bom_is_dropped(tmp_path):
    from tembed.eval.data import read_sts

    path = tmp_path / "pairs.tsv"
    path.write_bytes(
        '\ufeffsentence1\tsentence2\tscore\n"Stop," he said.\tHe said stop.\t4.5\nNo way\tThere is "no" way.\t3\n'.encode()
    )
    pairs = read_sts(str(path))
    assert pairs.first == ['"Stop," he said.', "No way"] and pairs.second[1] == 'There is "no" way.'
    assert pairs.gold == [4.5, 3.0]


def test_a_document_with_a_title_and_no_text_is_its_title(tmp_path):
    from tembed.eval.data import corpus_reader
    from tembed.io.readers import Record, Rejected

    path = tmp_path / "corpus.jsonl"
    lines = [
        {"_id": "d1", "title": "Only a title", "text": ""},
        {"_id": "d2", "title": "", "text": " "},
        {"_id": 3, "text": "x"},
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    items = list(corpus_reader(str(path)))
    assert items[0] == Record(1, "d1", "Only a title")
    assert isinstance(items[1], Rejected) and "empty" in items[1].reason
    assert items[2] == Record(3, "3", "x")
