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


def test_cli_eval_scores_fp_and_rtn_on_the_corpus_test_documents(tmp_path, capsys):
    """The harness's metrics on the first news test article (limit 1; news articles are short, ~800
    characters, so the test scores a few windows, not a 17k-token wiki article) for FP and RTN int4 (computed
    first, its weights kept): they come from one sum of log-likelihoods, so log(word ppl) * words =
    log(byte ppl) * bytes (the article's own counts, the harness's definitions) and bits per byte =
    log2(byte ppl); RTN's are worse."""
    from repro.cli import main
    from repro.config import make_config
    from repro.data import load_documents

    article = [d for d in load_documents("news")["test"] if d.strip()][0]
    words, n_bytes = len(re.split(r"\s+", article)), len(article.encode("utf-8"))
    found = {}
    for method, flags in (("fp", []), ("rtn", ["--bits", "4"])):
        assert main(["eval", "--tier", "ci", "--method", method, *flags, "--corpus", "news", "--limit", "1",
                     "--outputs", str(tmp_path)]) == 0
        config = make_config(method, 4 if method == "rtn" else None, "ci", corpus="news")
        kept = harness.read_results(config, tmp_path)[harness.LOCAL_TASK]
        metrics = {k.split(",")[0]: v for k, v in kept["metrics"].items() if not k.endswith("_stderr,none")}
        assert kept["max_length"] == config.seq_len and kept["limit"] == 1 and kept["corpus"] == "news"
        assert math.log(metrics["word_perplexity"]) * words == pytest.approx(math.log(metrics["byte_perplexity"]) * n_bytes, rel=1e-9)
        assert metrics["bits_per_byte"] == pytest.approx(math.log2(metrics["byte_perplexity"]), rel=1e-9)
        found[method] = metrics["word_perplexity"]
    assert 1 < found["fp"] < found["rtn"]
    assert "corpus_perplexity: word_perplexity" in capsys.readouterr().out
