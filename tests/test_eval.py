"""``tembed eval``: retrieval metrics equal to pytrec_eval's on sentence-transformers' vectors, quantized and M3
searches equal to a brute-force ranking computed here, STS-B's published Spearman, and bad data refused.

The BEIR folder is real InsuranceQA v2 data (valid split: 30 questions, the corpus their positives and first
negatives), written by examples/insuranceqa_to_beir.py.
"""

from __future__ import annotations

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
    counts = module.convert(folder, ["valid"], max_queries=30, pool_only=True, negatives=5)
    assert counts["valid_queries"] == 30 and counts["corpus"] > 150
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


def pytrec_metrics(qrels, rankings: dict[str, list[str]]) -> dict[str, float]:
    """MTEB's averages computed with pytrec_eval directly from rankings (rank-based scores keep their order)."""
    import pytrec_eval

    def run(depth=None):
        return {
            q: {d: float(len(docs[:depth]) - i) for i, d in enumerate(docs[:depth])} for q, docs in rankings.items()
        }

    evaluator = pytrec_eval.RelevanceEvaluator(qrels, {f"{m}.{CUTS}" for m in MEASURES.values()})
    scores = evaluator.evaluate(run())
    expected = {
        f"{name}_{k}": np.mean([s[f"{measure}_{k}"] for s in scores.values()])
        for name, measure in MEASURES.items()
        for k in K_VALUES
    }
    for k in K_VALUES:
        cut = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(run(k))
        expected[f"mrr_at_{k}"] = np.mean([s["recip_rank"] for s in cut.values()])
    return expected


def rankings_from(scores: np.ndarray, query_ids, doc_ids) -> dict[str, list[str]]:
    """Best first; ties keep corpus order (stable), as tembed documents."""
    order = np.argsort(-scores, axis=1, kind="stable")
    return {q: [doc_ids[j] for j in order[i]] for i, q in enumerate(query_ids)}


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


@pytest.fixture
def cli_on(monkeypatch):
    def use(encoder):
        monkeypatch.setattr(cli_eval, "open_eval_encoder", lambda config, device: SharedEncoder(encoder))

    return use


# ------------------------------------------------------------------------------------------------ retrieval
def test_metrics_equal_pytrec_eval_on_sentence_transformers_vectors(iqa, minilm_path, minilm_run):
    from sentence_transformers import SentenceTransformer

    doc_ids, doc_texts, query_ids, query_texts, qrels = read_beir(iqa)
    st = SentenceTransformer(minilm_path, device="cpu")
    docs = st.encode(doc_texts, normalize_embeddings=True, convert_to_numpy=True)
    queries = st.encode(query_texts, normalize_embeddings=True, convert_to_numpy=True)
    expected = pytrec_metrics(qrels, rankings_from(queries @ docs.T, query_ids, doc_ids))

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
    # ubinary: minus the Hamming distance, then the float query against the 0/1 bits (sentence-transformers' rescore)
    doc_bits, query_bits = quantize_embeddings(docs, "ubinary"), quantize_embeddings(queries, "ubinary")
    hamming = np.unpackbits(query_bits[:, None, :] ^ doc_bits[None, :, :], axis=-1).sum(axis=-1)
    first = np.argsort(hamming, axis=1, kind="stable")  # all docs are candidates (4 x 1000 > corpus)
    rescored = queries @ np.unpackbits(doc_bits, axis=-1)[:, :384].T.astype(np.float64)
    rescored_in_first_order = np.take_along_axis(rescored, first, axis=1)
    order = np.take_along_axis(first, np.argsort(-rescored_in_first_order, axis=1, kind="stable"), axis=1)
    binary_expected = pytrec_metrics(qrels, {q: [doc_ids[j] for j in order[i]] for i, q in enumerate(query_ids)})
    # int8 on ranges calibrated on the corpus, no rescoring: the codes' dot product
    doc_codes = quantize_embeddings(docs, "int8", calibration_embeddings=docs).astype(np.int64)
    query_codes = quantize_embeddings(queries, "int8", calibration_embeddings=docs).astype(np.int64)
    int8_expected = pytrec_metrics(qrels, rankings_from(query_codes @ doc_codes.T, query_ids, doc_ids))

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


@pytest.mark.parametrize("mode", ["sparse", "colbert", "hybrid"])
def test_m3_modes_equal_a_brute_force_ranking(iqa, tiny_m3_path, tmp_path_factory, mode):
    import tembed.eval
    from tembed.encoder import open_encoder
    from tembed.scoring import colbert_scores, lexical_scores
    from tembed.settings import EmbedderConfig

    folder = _small_folder(iqa, tmp_path_factory, docs=40)
    doc_ids, _, query_ids, query_texts, qrels = read_beir(folder)
    encoder = open_encoder(EmbedderConfig(tiny_m3_path, backend="torch", outputs=("dense", "sparse", "colbert")), "cpu")
    try:
        corpus = str(folder) + f"-{mode}.parquet"
        report = tembed.eval.retrieval(
            folder, tiny_m3_path, split="valid", mode=mode, encoder=encoder, corpus_embeddings=corpus,
            rerank_top_k=5, block_rows=7, passage_max_length=64,
        )  # fmt: skip
        from tembed.settings import EncodeOptions

        names = ("dense", "sparse", "colbert")
        queries = encoder.encode(query_texts, EncodeOptions(role="query", outputs=report_outputs(mode)))
    finally:
        encoder.close()
    table = pq.read_table(corpus)
    docs = _parquet_outputs(table)
    dense = queries.dense @ docs["dense"].T if queries.dense is not None else None
    sparse = lexical_scores(queries.sparse, docs["sparse"]) if queries.sparse is not None else None
    if mode == "sparse":
        expected = rankings_from(sparse, query_ids, doc_ids)
    else:
        first = dense if mode == "colbert" else (0.4 * dense + 0.2 * sparse) / 0.6
        colbert = colbert_scores(queries.colbert, docs["colbert"])
        final = colbert if mode == "colbert" else 0.4 * dense + 0.2 * sparse + 0.4 * colbert
        order = np.argsort(-first, axis=1, kind="stable")
        head = np.take_along_axis(final, order[:, :5], axis=1)
        order[:, :5] = np.take_along_axis(order[:, :5], np.argsort(-head, axis=1, kind="stable"), axis=1)
        expected = {q: [doc_ids[j] for j in order[i]] for i, q in enumerate(query_ids)}
    assert_same_metrics(report.metrics, pytrec_metrics(qrels, expected))
    assert names and report.options["mode"] == mode


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


@pytest.mark.parametrize("suffix", [".tsv", ".csv", ".jsonl"])
def test_sts_file_equals_scipy_on_sentence_transformers_vectors(minilm, minilm_path, tmp_path, suffix):
    from scipy.stats import pearsonr, spearmanr
    from sentence_transformers import SentenceTransformer

    import tembed.eval

    pairs = sts_b("dev")[:60]
    path = tmp_path / f"pairs{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps({"sentence1": a, "sentence2": b, "score": s}) + "\n" for a, b, s in pairs))
    else:
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle, delimiter="\t" if suffix == ".tsv" else ",")
            writer.writerow(["genre", "sentence1", "sentence2", "score"])
            writer.writerows(["x", a, b, s] for a, b, s in pairs)
    st = SentenceTransformer(minilm_path, device="cpu")
    first = st.encode([a for a, _, _ in pairs], normalize_embeddings=True)
    second = st.encode([b for _, b, _ in pairs], normalize_embeddings=True)
    cosines = np.sum(first * second, axis=1)
    gold = [s for _, _, s in pairs]
    report = tembed.eval.sts(str(path), minilm_path, encoder=minilm.encoder)
    assert report.metrics["cosine_spearman"] == pytest.approx(100 * spearmanr(gold, cosines).statistic, abs=1e-3)
    assert report.metrics["cosine_pearson"] == pytest.approx(100 * pearsonr(gold, cosines).statistic, abs=1e-3)


# ------------------------------------------------------------------------------------------------ bad input
def _refuse_to_load(config, device):
    raise AssertionError("the model was loaded before the data was checked")


@pytest.mark.parametrize(
    "case",
    ["no-split", "bad-header", "bad-score", "missing-query", "quantize-sparse", "bad-weights", "sts-missing-column"],
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
        "bad-score": "valid.tsv:3: score 'high' is not a number",
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
    elif case == "bad-score":
        qrels.write_text("\n".join([*lines[:2], lines[2].rsplit("\t", 1)[0] + "\thigh", *lines[3:]]) + "\n")
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
