"""lm-evaluation-harness on the embedded model: `repro eval` of a ci-tier run offline, results beside the record."""
import math
import re

import pytest

from repro import harness

pytestmark = pytest.mark.embedded


def test_unknown_or_no_task_is_refused_before_any_evaluation():
    with pytest.raises(ValueError, match="unknown lm-eval task.*no_such_task.*corpus_perplexity works offline"):
        harness.harness_eval(None, None, ["no_such_task"])
    with pytest.raises(ValueError, match="no task given"):
        harness.harness_eval(None, None, [])


def test_cli_eval_scores_fp_and_gptq_on_the_corpus_test_documents(ci_outputs, capsys):
    """The harness's metrics on the first wiki test article (limit 1) for FP and GPTQ int4 (the landscape's
    run, whose weights the ci records keep): they come from one sum of log-likelihoods, so log(word ppl) *
    words = log(byte ppl) * bytes (the article's own counts, the harness's definitions) and bits per byte =
    log2(byte ppl); GPTQ's are worse."""
    from repro.cli import main
    from repro.config import make_config
    from repro.data import load_documents

    article = [d for d in load_documents("wiki")["test"] if d.strip()][0]
    words, n_bytes = len(re.split(r"\s+", article)), len(article.encode("utf-8"))
    found = {}
    for method, flags in (("fp", []), ("gptq", ["--bits", "4"])):
        assert main(["eval", "--tier", "ci", "--method", method, *flags, "--limit", "1",
                     "--outputs", str(ci_outputs)]) == 0
        config = make_config(method, 4 if method == "gptq" else None, "ci")
        kept = harness.read_results(config, ci_outputs)[harness.LOCAL_TASK]
        metrics = {k.split(",")[0]: v for k, v in kept["metrics"].items() if not k.endswith("_stderr,none")}
        assert kept["max_length"] == config.seq_len and kept["limit"] == 1 and kept["corpus"] == "wiki"
        assert math.log(metrics["word_perplexity"]) * words == pytest.approx(math.log(metrics["byte_perplexity"]) * n_bytes, rel=1e-9)
        assert metrics["bits_per_byte"] == pytest.approx(math.log2(metrics["byte_perplexity"]), rel=1e-9)
        found[method] = metrics["word_perplexity"]
    assert 1 < found["fp"] < found["gptq"]
    assert "corpus_perplexity: word_perplexity" in capsys.readouterr().out
