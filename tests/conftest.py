import itertools

import pytest
import torch

from suformer.data.corpora import peoples_daily, review_sentences
from suformer.tokenizer import Tokenizer, build_vocab, write_vocab


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def news():
    return list(itertools.islice(peoples_daily(), 3000))


@pytest.fixture(scope="session")
def reviews():
    return list(itertools.islice(review_sentences("pos"), 1000)) + list(itertools.islice(review_sentences("neg"), 1000))


@pytest.fixture(scope="session")
def vocab_file(tmp_path_factory, news, reviews):
    """A T5-PEGASUS-style word+char vocab built from the bundled corpora (no hub downloads here)."""
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    write_vocab(build_vocab(news[:2000] + reviews[:1000], 12000), path)
    return path


@pytest.fixture(scope="session")
def char_vocab_file(tmp_path_factory, news, reviews):
    path = tmp_path_factory.mktemp("char_vocab") / "vocab.txt"
    write_vocab(build_vocab(news[:2000] + reviews[:1000], 6000, words=False), path)
    return path


@pytest.fixture(scope="session")
def tokenizer(vocab_file):
    return Tokenizer(vocab_file, pre_tokenize="jieba")


def set_backend(model, backend):
    """Switch every attention module of a built model to another backend."""
    model.config.attention_backend = backend
    for module in model.modules():
        if hasattr(module, "backend"):
            module.backend = backend
        if hasattr(module, "config") and hasattr(module.config, "attention_backend"):
            module.config.attention_backend = backend
    return model


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()
