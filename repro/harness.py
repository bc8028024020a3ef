"""lm-evaluation-harness on repro's models: numbers comparable with everyone else's.

``harness_eval`` runs ``lm_eval.simple_evaluate`` on an in-memory model (quantized or not) through
the harness's ``HFLM`` wrapper. Tasks are the harness's own by name (``wikitext``, ``lambada_openai``,
``hellaswag``, ``arc_easy``, ``piqa``, ``winogrande``: they download their data from the hub) or
``corpus_perplexity``, built here from a corpus's test split (``repro.data.load_documents``; works
offline on the embedded corpora): one document per article of the offline corpora and per file of a
directory (a hub corpus or a single text file: one per split), scored with the harness's
``loglikelihood_rolling`` and its metrics ``word_perplexity``, ``byte_perplexity`` and
``bits_per_byte`` (its ``wikitext`` task's definitions: exp(-sum of log-likelihoods / words or UTF-8
bytes), and -sum / bytes / ln 2). The harness cuts each document into windows of ``max_length``
tokens that each see one token of context, the first after the tokenizer's BOS (or EOS) token, so its
numbers differ from repro's per-window NLL (``repro.evaluate``), which puts BOS in front of every window.

``eval_run`` does it for a run (its kept quantized weights, ``repro.runs.quantized_model``) and keeps
the results beside the run's record, ``<record>.lm_eval.json`` (one entry per task, the settings with it).
Needs ``pip install 'repro-lowbit-quant[eval]'`` (lm-eval 0.4).
"""
from __future__ import annotations

import json
from pathlib import Path

LOCAL_TASK = "corpus_perplexity"
STANDARD_TASKS = ("wikitext", "lambada_openai", "hellaswag", "arc_easy", "piqa", "winogrande")
PERPLEXITY_METRICS = ("word_perplexity", "byte_perplexity", "bits_per_byte")


def perplexity_task(corpus: str, split: str = "test") -> dict:
    """The harness task config of ``LOCAL_TASK``: every document of ``corpus``'s ``split`` scored whole
    (rolling log-likelihood), with the harness's perplexity metrics."""
    from repro import require
    from repro.data import load_documents

    datasets = require("datasets", "eval")
    Dataset, DatasetDict = datasets.Dataset, datasets.DatasetDict

    documents = [d for d in load_documents(corpus)[split] if d.strip()]

    def dataset(**_metadata):  # the harness calls it with the task's metadata
        return DatasetDict({split: Dataset.from_dict({"text": documents})})

    return {"task": LOCAL_TASK, "custom_dataset": dataset, "test_split": split,
            "output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
            "should_decontaminate": True, "doc_to_decontamination_query": "{{text}}",
            "metric_list": [{"metric": m, "aggregation": "bits_per_byte" if m == "bits_per_byte" else "weighted_perplexity",
                             "higher_is_better": False} for m in PERPLEXITY_METRICS],
            "metadata": {"version": 1.0, "corpus": corpus, "split": split, "documents": len(documents)}}


def harness_eval(model, tokenizer, tasks=(LOCAL_TASK,), corpus: str = "wiki", batch_size: int = 4,
                 max_length: int | None = None, limit: int | None = None, name: str | None = None) -> dict:
    """``lm_eval.simple_evaluate`` on ``model`` (a transformers causal LM in memory) for ``tasks``.

    ``max_length``: tokens per window (None: the model's maximum); ``limit``: documents / examples per
    task (None: all); ``name``: how the results name the model. Returns ``{task: {metric: value}}``
    under ``results`` with the harness's ``versions``, ``n-samples``, its version and these settings,
    all JSON-able. Unknown task names raise before any evaluation."""
    from repro import require

    lm_eval = require("lm_eval", "eval")
    HFLM, TaskManager = require("lm_eval.models.huggingface", "eval").HFLM, require("lm_eval.tasks", "eval").TaskManager

    tasks = list(tasks)
    standard = [t for t in tasks if t != LOCAL_TASK]
    manager = TaskManager(include_defaults=bool(standard))  # indexing every default task takes seconds
    unknown = [t for t in standard if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown lm-eval task(s) {', '.join(unknown)}; {LOCAL_TASK} works offline, "
                         f"standard ones include {', '.join(STANDARD_TASKS)}")
    if not tasks:
        raise ValueError(f"no task given; e.g. {LOCAL_TASK} (offline) or {', '.join(STANDARD_TASKS)}")
    if name:
        model.config._name_or_path = name  # what the harness records as the model
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    chosen = [perplexity_task(corpus) if t == LOCAL_TASK else t for t in tasks]
    result = lm_eval.simple_evaluate(model=lm, tasks=chosen, task_manager=manager, limit=limit,
                                     log_samples=False, bootstrap_iters=0)
    return {"results": result["results"], "versions": result["versions"], "n-samples": result["n-samples"],
            "lm_eval_version": lm_eval.__version__ if hasattr(lm_eval, "__version__") else None,
            "settings": {"corpus": corpus if LOCAL_TASK in tasks else None, "max_length": lm.max_length,
                         "batch_size": batch_size, "limit": limit, "model": name}}


def results_path(config, outputs=None) -> Path:
    """Where a run's harness results live: beside its record, ``<record>.lm_eval.json``."""
    from repro.store import record_path

    return record_path(config, outputs).with_suffix(".lm_eval.json")


def read_results(config, outputs=None) -> dict:
    """A run's kept harness results (``{task: {metrics, settings ...}}``; empty when none)."""
    from repro.store import read_json

    return read_json(results_path(config, outputs), what="lm-eval results") or {}


def eval_run(config, tasks=(LOCAL_TASK,), outputs=None, batch_size: int = 4, max_length: int | None = None,
             limit: int | None = None) -> dict:
    """``harness_eval`` on a run's quantized model (``repro.runs.quantized_model``; computed first when its
    weights are not kept), on the run's corpus, windows of the run's ``seq_len`` by default; the
    results are merged into ``results_path`` (a task evaluated again replaces its entry). Returns them."""
    from repro import runs
    from repro.store import write_json_atomic

    import torch

    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer, _ = runs.quantized_model(config, outputs, device=device)
    found = harness_eval(model, tokenizer, tasks, config.corpus, batch_size, max_length or config.seq_len, limit,
                         name=f"{config.model} {config.label()}")
    path = results_path(config, outputs)
    kept = read_results(config, outputs)
    for task, metrics in found["results"].items():
        kept[task] = {"metrics": metrics, "version": found["versions"].get(task),
                      "n_samples": found["n-samples"].get(task), "lm_eval_version": found["lm_eval_version"],
                      **found["settings"], "record_key": config.key()}
    write_json_atomic(path, json.loads(json.dumps(kept, default=str)))
    return kept
