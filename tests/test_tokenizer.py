"""The tokenizer against transformers' BertTokenizer (basic + WordPiece) composed with T5 PEGASUS' jieba rule."""
import random
import unicodedata

import jieba
import pytest

from suformer.corpora import peoples_daily
from suformer.tokenizer import SPECIAL_TOKENS, Tokenizer, build_vocab, jieba_words, load_vocab, normalize, write_vocab

CRAFTED = [
    "iPhone 15 Pro Max 国行售价8999元，比去年贵了1000元！",
    "ＡＢＣ全角字母１２３和全角标点（括号）：“引号”。",
    "今天心情很好😀🎉，出去玩了一整天～",
    "Café naïve résumé 的重音符号会被去掉",
    "网址 https://www.example.com/path?q=中文 与邮箱 someone@example.org",
    "圆周率约等于3.14159，e≈2.71828。",
    "制表符\t换行\n回车\r以及\u3000全角空格",
    "一个超长的拉丁单词" + "a" * 250 + "之后还有中文",
    "控制字符\x00\x07和替换字符\ufffd应当被丢弃",
]


def bert4keras_reference(hf, vocab, text, use_jieba):
    """bert4keras' algorithm with transformers doing the basic tokenizer + WordPiece part."""
    text = unicodedata.normalize("NFD", text.lower())
    text = "".join(ch for ch in text if unicodedata.category(ch) != "Mn")
    words = jieba.cut(text, HMM=False) if use_jieba else [text]
    tokens = []
    for word in words:
        tokens.extend([word] if use_jieba and word in vocab else hf.tokenize(word))
    return [vocab["[CLS]"]] + [vocab.get(t, vocab["[UNK]"]) for t in tokens] + [vocab["[SEP]"]]


def hf_bert(vocab_file):
    try:  # transformers >= 5 keeps the pure-Python WordPiece here
        from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy as BertTokenizer
    except ImportError:
        from transformers import BertTokenizer

    hf = BertTokenizer(str(vocab_file), do_lower_case=True, tokenize_chinese_chars=True)
    hf.wordpiece_tokenizer.max_input_chars_per_word = 200  # bert4keras' word_maxlen
    return hf


@pytest.mark.parametrize("mode", ["jieba", "char"])
def test_same_ids_as_bert4keras_algorithm_on_real_text(mode, vocab_file, char_vocab_file, news, reviews):
    path = vocab_file if mode == "jieba" else char_vocab_file
    ours = Tokenizer(path, pre_tokenize="jieba" if mode == "jieba" else None)
    hf, vocab = hf_bert(path), load_vocab(path)
    texts = news[2000:2600] + reviews[1000:1600] + CRAFTED
    mismatches = [t for t in texts if ours.encode(t) != bert4keras_reference(hf, vocab, t, mode == "jieba")]
    assert mismatches == []
    # Unseen words fall back to characters; words of the vocab stay whole in jieba mode only.
    assert len(ours.tokenize("中华人民共和国")) >= 3


def test_jieba_words_are_jiebas_own_cut_word_for_word(reviews):
    """jieba-rs computes the segmentation: it must be jieba.cut(HMM=False)'s, on every People's Daily paragraph
    (as written and normalized) and on random strings mixing CJK, Latin, digits, full-width forms, whitespace,
    emoji and controls."""
    rng = random.Random(0)
    alphabet = list("的一是了我不人在他有这个上们来到时大地为中国年着就和要出也得后自以会中华人民共和国ABCabc xyz123"
                    "４５６，。！？、；：“”（）《》\n\r\t\u3000-_.@#%&*+=/'\"😀ßé\u0301\x00\ufffd")
    alphabet += [chr(rng.choice([rng.randint(0x20, 0xD7FF), rng.randint(0xE000, 0x2FFFF)])) for _ in range(200)]
    randoms = ["".join(rng.choices(alphabet, k=rng.randint(0, 60))) for _ in range(5000)]
    texts = [t for p in peoples_daily() for t in (p, normalize(p))] + reviews + CRAFTED + randoms
    assert [t for t in texts if jieba_words(t) != jieba.lcut(t, HMM=False)] == []


def test_normalize_is_bert4keras_lowercase_and_normalize(news):
    for text in news[:500] + CRAFTED:
        decomposed = unicodedata.normalize("NFD", text.lower())
        assert normalize(text) == "".join(ch for ch in decomposed if unicodedata.category(ch) != "Mn")


def test_emoji_and_unknown_characters_become_unk(tokenizer):
    ids = tokenizer.encode("好😀")
    assert ids[-2] == tokenizer.unk_id and ids[0] == tokenizer.cls_id and ids[-1] == tokenizer.sep_id


def test_truncation_pops_from_the_right_and_keeps_sep(tokenizer, news):
    text = "".join(news[:40])  # far over any maxlen
    full = tokenizer.encode(text)
    cut = tokenizer.encode(text, maxlen=64)
    assert len(full) > 1000 and len(cut) == 64
    assert cut == full[:63] + [tokenizer.sep_id]


def test_pair_truncation_pops_from_the_longer_part(tokenizer):
    first, second = "国家主席发表新年讲话，回顾了过去一年的成就。", "新年讲话"
    a, b = tokenizer.encode(first), tokenizer.encode(second)[1:]
    ids, segments = tokenizer.encode_pair(first, second, maxlen=len(b) + 8)
    # bert4keras truncate_sequences: pop index -2 of the longer sequence until the total fits.
    while len(a) + len(b) > len(b) + 8:
        (a if len(a) >= len(b) else b).pop(-2)
    assert ids == a + b and segments == [0] * len(a) + [1] * len(b)


def test_decode_restores_chinese_text(tokenizer, reviews):
    cjk_only = [r for r in reviews if all("\u4e00" <= ch <= "\u9fff" or ch in "，。！？、" for ch in r)][:50]
    assert cjk_only
    for text in cjk_only:
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_decode_spaces_latin_words_only(tokenizer):
    # bert4keras' rule: Latin words are space-separated, a single CJK character attaches directly.
    assert tokenizer.decode(tokenizer.encode("hello world 你 好")) == "hello world你好"


def test_vocab_builder_layout(tmp_path, news):
    tokens = build_vocab(news[:500], 3000)
    assert len(tokens) == 3000 and len(set(tokens)) == 3000
    assert tokens[:106] == SPECIAL_TOKENS
    assert [tokens[i] for i in (0, 100, 101, 102, 103)] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert any(len(t) > 1 and "\u4e00" <= t[0] <= "\u9fff" for t in tokens)  # jieba words
    char_tokens = build_vocab(news[:500], 3000, words=False)
    assert not any(len(t) > 1 and "\u4e00" <= t[0] <= "\u9fff" for t in char_tokens)
    write_vocab(tokens, tmp_path / "vocab.txt")
    tok = Tokenizer(tmp_path / "vocab.txt")
    assert tok.unk_id not in tok.encode(news[0])  # every character of the corpus is in the vocab


def test_bad_vocab_files_name_the_line(tmp_path):
    (tmp_path / "dup.txt").write_text("\n".join(SPECIAL_TOKENS + ["中", "国", "中"]) + "\n")
    with pytest.raises(ValueError, match=r"line 109: duplicate token '中' \(first on line 107\)"):
        Tokenizer(tmp_path / "dup.txt")
    (tmp_path / "nocls.txt").write_text("[PAD]\n[UNK]\n[SEP]\n")
    with pytest.raises(ValueError, match=r"no \[CLS\] token"):
        Tokenizer(tmp_path / "nocls.txt")


def test_save_and_load_pretrained(tmp_path, tokenizer, news):
    tokenizer.save_pretrained(tmp_path)
    again = Tokenizer.from_pretrained(tmp_path)
    assert again.pre_tokenize == "jieba" and again.encode(news[7]) == tokenizer.encode(news[7])
