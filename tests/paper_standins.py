"""Stand-ins for everything the paper tier downloads, laid out exactly as the Hugging Face caches
hold them, so that `repro batch --tier paper` runs with ``HF_HOME`` pointing here and
``HF_HUB_OFFLINE=1`` through the unchanged ``from_pretrained`` / ``load_dataset`` calls.

* Models: tiny random GPT-2 / OPT / Llama / Mistral under the paper's hub ids, in the hub cache
  (``hub/models--ORG--NAME/snapshots/REV`` + ``refs/main``), stored in the dtype the real
  checkpoints ship in (fp16 for OPT, Llama and Mistral; fp32 for GPT-2), each with a maximum
  length of ``MAX_LENGTH`` tokens that the tier's ``seq_len: null`` uses in full.
* One byte-level BPE tokenizer (512 tokens) trained on the text, saved with every model.
* Corpora: WikiText-2, C4 and LAMBADA as the datasets library caches a prepared hub dataset
  (``datasets/NAME/CONFIG/0.0.0/HASH`` with Arrow files), filled with real English text from the
  embedded ``wiki`` corpus.

``python tests/paper_standins.py DIR`` fills ``DIR`` (then ``HF_HOME=DIR HF_HUB_OFFLINE=1``).
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import tiny_model  # noqa: E402

MODELS = {"gpt2": ("gpt2", torch.float32), "facebook/opt-125m": ("opt", torch.float16),
          "meta-llama/Llama-2-7b-hf": ("llama", torch.float16),
          "mistralai/Mistral-7B-v0.1": ("mistral", torch.float16)}
REVISION = "0" * 40
VOCAB = 512
# The smallest sizes that still exercise the protocol: 128 calibration sequences of the model's full
# length fit the train split many times over, and every evaluation split holds several batches of 8.
MAX_LENGTH = 32
EOS = "<|endoftext|>"
# (dataset id, config, load_dataset's data_files, {split: characters of text})
CORPORA = [("wikitext", "wikitext-2-raw-v1", None, {"train": 60_000, "validation": 6_000, "test": 6_000}),
           ("allenai/c4", None, {"train": "en/c4-train.00000-of-01024.json.gz",
                                 "validation": "en/c4-validation.00000-of-00008.json.gz"},
            {"train": 60_000, "validation": 12_000}),
           ("EleutherAI/lambada_openai", "en", None, {"test": 18_000})]


def english_paragraphs(limit: int = 1000) -> list[str]:
    """The embedded ``wiki`` corpus in a fixed order as rows of at most ~``limit`` characters
    (whole sentences), so every split of every stand-in corpus gets many rows."""
    from repro.data import load_corpus

    rows = []
    for paragraph in "\n\n".join(load_corpus("wiki").values()).split("\n\n"):
        row = ""
        for sentence in paragraph.strip().split(". "):
            if row and len(row) + len(sentence) > limit:
                rows.append(row)
                row = ""
            row = f"{row}. {sentence}" if row else sentence
        if row:
            rows.append(row)
    return rows


def train_tokenizer(paragraphs: list[str]):
    """A byte-level BPE tokenizer of ``VOCAB`` tokens with GPT-2's end-of-text token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(paragraphs, trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, model_max_length=MAX_LENGTH)


def add_models(home: Path, tokenizer) -> None:
    for repo, (family, dtype) in MODELS.items():
        root = home / "hub" / f"models--{repo.replace('/', '--')}"
        snapshot = root / "snapshots" / REVISION
        model = tiny_model(family, vocab=len(tokenizer), positions=MAX_LENGTH).to(dtype)
        for config in (model.config, model.generation_config):
            config.bos_token_id = config.eos_token_id = tokenizer.eos_token_id
        model.save_pretrained(snapshot)
        tokenizer.save_pretrained(snapshot)
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / "main").write_text(REVISION)


def add_corpora(home: Path, paragraphs: list[str]) -> None:
    """Each corpus as the datasets cache holds a prepared hub dataset; offline, ``load_dataset``
    finds it by the directory name its own call derives (``CachedDatasetModuleFactory``)."""
    import datasets
    from datasets.packaged_modules.json.json import Json

    cache = home / "datasets"
    pool = iter(paragraphs * 20)
    with tempfile.TemporaryDirectory() as tmp:
        for repo, config, data_files, sizes in CORPORA:
            files = {}
            for split, chars in sizes.items():
                rows, n = [], 0
                while n < chars:
                    rows.append(next(pool))
                    n += len(rows[-1])
                files[split] = Path(tmp, f"{repo.replace('/', '_')}-{split}.jsonl")
                files[split].write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
            builder = Json(cache_dir=str(Path(tmp, "build")), dataset_name=repo.split("/")[-1],
                           config_name=config or "default", hash=REVISION[:16],
                           data_files={s: str(p) for s, p in files.items()})
            builder.download_and_prepare()
            wanted = (datasets.BuilderConfig("default").create_config_id({"data_files": data_files})
                      if data_files else config)
            target = cache / "___".join(repo.split("/")) / wanted / "0.0.0" / REVISION[:16]
            target.parent.mkdir(parents=True, exist_ok=True)
            Path(builder.cache_dir).rename(target)


def fill(home: Path) -> Path:
    """Fill ``home`` (an ``HF_HOME``) with every stand-in; returns ``home``."""
    home = Path(home)
    paragraphs = english_paragraphs()
    add_models(home, train_tokenizer(paragraphs))
    add_corpora(home, paragraphs)
    return home


if __name__ == "__main__":
    fill(Path(sys.argv[1]))
