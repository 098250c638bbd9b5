"""Run BAAI FlagEmbedding (reference implementation) on a list of jobs and dump outputs to .npz.

Must run in the reference venv (FlagEmbedding 1.4.2, transformers<5):

    .venv-ref/bin/python tests/reference/flagembedding_runner.py JOB.json OUT.npz

JOB.json is a list of jobs (or {"jobs": [...]}); each job::

    {"name": "minilm_q",                       # key prefix in OUT.npz (unique)
     "class": "FlagModel" | "FlagLLMModel" | "FlagICLModel" | "BGEM3FlagModel" | "FlagAutoModel",
     "model": "/path/to/model",
     "init": {...},                            # constructor kwargs (use_fp16=False, devices="cpu" forced unless set)
     "method": "encode" | "encode_queries" | "encode_corpus" | "compute_score"
               | "compute_lexical_matching_score" | "colbert_score",
     "args": {...},                            # method kwargs
     "reference_args": {...},                  # optional: kwargs for this runner's call only (e.g. batch_size)
     "texts": [...]}                           # a list, or a bare string

* encode*: plain ndarray output -> ``{name}`` (float32).  M3 dict output ->
  ``{name}__dense_vecs`` (float32), ``{name}__lexical_weights`` (1-element str array holding
  ``json.dumps(list of {str(token_id): float})``; a dict instead of a list for a bare-string input),
  ``{name}__colbert_vecs__{i}`` (float32, one per text).  Keys whose value is None are omitted.
* compute_score (M3): job has ``"pairs": [[q, p], ...]`` (or a single [q, p]) instead of texts;
  writes ``{name}__{mode}`` (float64) for each mode returned ("dense", "sparse", "colbert",
  "sparse+dense", "colbert+sparse+dense").
* compute_lexical_matching_score / colbert_score (M3): either ``"texts"`` + ``"passages"`` ->
  ``{name}`` matrix [len(texts), len(passages)], or ``"pairs"`` -> ``{name}`` vector, one score per
  pair.  Texts are first encoded with ``model.encode(texts, return_dense=False, return_sparse=True |
  return_colbert_vecs=True, **args)`` (``args`` go to that encode call).

Model objects are cached between jobs with the same (class, model, init).  Nothing is printed except
errors; a failing job is reported on stderr, the others are still written, and the exit code is 1.
"""

import contextlib
import json
import logging
import os
import sys
import traceback
import warnings

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)  # FlagEmbedding logs info/warnings (e.g. default weights) via logging

import numpy as np  # noqa: E402

CLASSES = ("FlagModel", "FlagLLMModel", "FlagICLModel", "BGEM3FlagModel", "FlagAutoModel")
ENCODE_METHODS = ("encode", "encode_queries", "encode_corpus")
SCORE_METHODS = ("compute_score", "compute_lexical_matching_score", "colbert_score")


def _to_np(x, dtype=np.float32):
    if hasattr(x, "detach"):  # torch tensor (convert_to_numpy=False or colbert_score)
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def _lexical_to_json(lw):
    def one(d):
        return {str(k): float(v) for k, v in d.items()}

    if isinstance(lw, dict):
        return json.dumps(one(lw))
    return json.dumps([one(d) for d in lw])


def _load_model(job, cache):
    import FlagEmbedding

    cls_name = job["class"]
    if cls_name not in CLASSES:
        raise ValueError(f"unknown class {cls_name!r}; expected one of {CLASSES}")
    init = dict(job.get("init") or {})
    init.setdefault("use_fp16", False)
    init.setdefault("devices", "cpu")
    key = json.dumps([cls_name, job["model"], init], sort_keys=True, default=str)
    if key not in cache:
        import torch

        torch.manual_seed(0)  # deterministic random heads if a checkpoint lacks them
        if cls_name == "FlagAutoModel":
            cache[key] = FlagEmbedding.FlagAutoModel.from_finetuned(job["model"], **init)
        else:
            cache[key] = getattr(FlagEmbedding, cls_name)(job["model"], **init)
    return cache[key]


def _store_encode_output(out, name, res):
    if isinstance(res, dict):  # BGEM3FlagModel
        if res.get("dense_vecs") is not None:
            out[f"{name}__dense_vecs"] = _to_np(res["dense_vecs"])
        if res.get("lexical_weights") is not None:
            out[f"{name}__lexical_weights"] = np.array([_lexical_to_json(res["lexical_weights"])])
        cv = res.get("colbert_vecs")
        if cv is not None:
            if not isinstance(cv, list):  # bare-string input: a single (n_tok, dim) array
                cv = [cv]
            for i, v in enumerate(cv):
                out[f"{name}__colbert_vecs__{i}"] = _to_np(v)
    else:
        out[name] = _to_np(res)


def _pairs(job):
    pairs = job["pairs"]
    if len(pairs) == 2 and all(isinstance(p, str) for p in pairs):
        return pairs  # single pair, passed through unchanged
    return [tuple(p) for p in pairs]


def _run_pairwise(model, job, out):
    name, method, args = job["name"], job["method"], dict(job.get("args") or {})
    lexical = method == "compute_lexical_matching_score"
    field = "lexical_weights" if lexical else "colbert_vecs"
    enc_kw = dict(return_dense=False, return_sparse=lexical, return_colbert_vecs=not lexical)
    enc_kw.update(args)

    def enc(texts):
        return model.encode(list(texts), **enc_kw)[field]

    if "pairs" in job:
        pairs = job["pairs"]
        if len(pairs) == 2 and all(isinstance(p, str) for p in pairs):
            pairs = [pairs]
        qs, ps = enc([p[0] for p in pairs]), enc([p[1] for p in pairs])
        if lexical:
            scores = [model.compute_lexical_matching_score(q, p) for q, p in zip(qs, ps, strict=False)]
        else:
            scores = [model.colbert_score(q, p) for q, p in zip(qs, ps, strict=False)]
        out[name] = np.array([float(_to_np(s, np.float64)) for s in scores], dtype=np.float64)
    else:
        qs, ps = enc(job["texts"]), enc(job["passages"])
        if lexical:
            out[name] = _to_np(model.compute_lexical_matching_score(qs, ps), np.float64).reshape(len(qs), len(ps))
        else:
            out[name] = np.array(
                [[float(_to_np(model.colbert_score(q, p), np.float64)) for p in ps] for q in qs], dtype=np.float64
            )


def run_job(job, cache, out):
    name, method = job["name"], job["method"]
    args = {**(job.get("args") or {}), **(job.get("reference_args") or {})}
    model = _load_model(job, cache)
    if method in ENCODE_METHODS:
        res = getattr(model, method)(job["texts"], **args)
        _store_encode_output(out, name, res)
    elif method == "compute_score":
        res = model.compute_score(_pairs(job), **args)
        for mode, vals in res.items():
            out[f"{name}__{mode}"] = np.asarray(vals, dtype=np.float64)
    elif method in SCORE_METHODS:
        _run_pairwise(model, job, out)
    else:
        raise ValueError(f"unknown method {method!r}; expected one of {ENCODE_METHODS + SCORE_METHODS}")


def main(argv):
    if len(argv) != 3:
        sys.stderr.write("usage: flagembedding_runner.py JOB.json OUT.npz\n")
        return 2
    with open(argv[1], encoding="utf-8") as f:
        jobs = json.load(f)
    if isinstance(jobs, dict):
        jobs = jobs.get("jobs", [jobs])
    names = [j.get("name") for j in jobs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        sys.stderr.write(f"duplicate job names: {dupes}\n")
        return 2

    out, cache, failed = {}, {}, []
    for job in jobs:
        try:
            # FlagEmbedding / transformers print a few things to stdout; keep stdout clean.
            with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
                run_job(job, cache, out)
        except Exception:  # report and keep going
            failed.append(job.get("name"))
            sys.stderr.write(f"[flagembedding_runner] job {job.get('name')!r} failed:\n{traceback.format_exc()}\n")

    out_path = argv[2]
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmp = out_path + ".tmp.npz"
    np.savez(tmp, **out)
    os.replace(tmp, out_path)
    cache.clear()
    if failed:
        sys.stderr.write(f"[flagembedding_runner] {len(failed)} job(s) failed: {failed}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
