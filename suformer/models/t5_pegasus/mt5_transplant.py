"""T5 PEGASUS' starting point: mT5's weights re-indexed to a jieba word-level vocab, as ZhuiyiTechnology/t5-pegasus
`train.py` built it (spec: models.md §1.3, "How the 50k vocab was built from mT5").

In the source vocab's order:
- the first 106 (BERT-style special) tokens keep their ids and take mT5's `<unk>` row;
- every other token takes the row of its sentencepiece id when the lookup finds one: `##x` tries `x`, then `▁##x`
  (the published lookup keeps the `##` there; kept as published, since it decides which rows T5 PEGASUS started
  from); any other `x` tries `▁x`, then `x`;
- the tokens not found go last, as compound tokens whose row is the mean of their sentencepiece pieces' rows
  (a piece that no kept token maps to counts as the first special's row, i.e. `<unk>`'s).
The output vocab is [specials][matched][compound]. The same mapping applies to the untied LM head; every other
weight is mT5's. Re-running the mapping on an already converted vocab keeps its order.
"""
from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ...tokenizer import SPECIAL_TOKENS, load_vocab
from ..checkpoints import _read_weights, canonical_state, load_state
from ..registry import CheckpointError
from .model import T5PegasusForConditionalGeneration
from .layout import SPEC as T5_SPEC, config_fields_from_json

SPM_FILES = ("spiece.model", "sentencepiece.model")


@dataclass(frozen=True)
class VocabTransplant:
    """The new vocab, and for each of its tokens the mT5 rows whose mean initialises it."""
    tokens: list[str]
    rows: list[list[int]]
    matched: int  # tokens found in the sentencepiece vocab (after the specials)

    @property
    def compound(self) -> int:
        return len(self.tokens) - len(SPECIAL_TOKENS) - self.matched

    def apply(self, table: torch.Tensor) -> torch.Tensor:
        """`table`'s rows re-indexed: row i of the result is the mean of `table[rows[i]]` (one pass of
        embedding_bag: no [tokens, pieces, d_model] intermediate, which for mT5-base would be gigabytes)."""
        pieces = torch.tensor([i for row in self.rows for i in row])
        offsets = torch.tensor([0, *itertools.accumulate(len(row) for row in self.rows)][:-1])
        return F.embedding_bag(pieces, table.float(), offsets, mode="mean").to(table.dtype)


def plan_transplant(vocab: list[str], sp) -> VocabTransplant:
    """The re-indexing of `vocab` (a BERT-format word + char vocab whose first 106 tokens are the specials) onto the
    sentencepiece model `sp` (a `sentencepiece.SentencePieceProcessor`)."""
    specials = len(SPECIAL_TOKENS)
    if vocab[:specials] != SPECIAL_TOKENS:
        raise ValueError("the vocab must start with the 106 BERT-style specials ([PAD], [unused1..99], [UNK], "
                         "[CLS], [SEP], [MASK], <S>, <T>), as suformer's and T5 PEGASUS' vocabs do")
    unk = sp.unk_id()
    tokens, rows, compound = list(vocab[:specials]), [[unk]] * specials, []
    for token in vocab[specials:]:
        if token.startswith("##"):
            first, second = token[2:], "\u2581" + token
        else:
            first, second = "\u2581" + token, token
        piece = sp.piece_to_id(first)
        if piece == unk:
            piece = sp.piece_to_id(second)
        if piece == unk:
            compound.append(token)
        else:
            tokens.append(token)
            rows.append([piece])
    matched = len(tokens) - specials
    # A piece takes its own row when some kept token has it, else token 0's row (`<unk>`'s), as published.
    kept = {r[0] for r in rows}
    for token in compound:
        pieces = [i if i in kept else unk for i in map(sp.piece_to_id, sp.encode_as_pieces(token))]
        tokens.append(token)
        rows.append(pieces or [unk])
    return VocabTransplant(tokens, rows, matched)


def convert_mt5(mt5_dir, vocab_file, compat: str = "bert4keras") -> tuple[T5PegasusForConditionalGeneration,
                                                                            VocabTransplant]:
    """A T5 PEGASUS model initialised from the transformers-layout mT5 in `mt5_dir` (config.json, weights,
    spiece.model) on the vocab of `vocab_file`. `compat="bert4keras"` is what T5 PEGASUS' pretraining started from
    (bert4keras loaded mT5's head as it is, behind its d_model**-0.5 output scale); "hf" keeps mT5's function."""
    import sentencepiece

    mt5_dir = Path(mt5_dir)
    spm = next((mt5_dir / name for name in SPM_FILES if (mt5_dir / name).is_file()), None)
    if spm is None:
        raise CheckpointError(f"{mt5_dir}: no sentencepiece model ({' or '.join(SPM_FILES)})")
    config_file = mt5_dir / "config.json"
    try:
        cfg = json.loads(config_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{config_file}: not found") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_file}: not valid JSON ({e})") from None
    if cfg.get("model_type") not in ("mt5", "t5"):
        raise CheckpointError(f"{config_file}: model_type={cfg.get('model_type')!r}, not an mT5")
    state = canonical_state(T5_SPEC, _read_weights(mt5_dir), mt5_dir)
    if "lm_head.weight" not in state or torch.equal(state["lm_head.weight"], state["shared.weight"]):
        raise CheckpointError(f"{mt5_dir}: no separate lm_head.weight; mT5 (T5.1.1) has an untied LM head")
    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm))
    rows = state["shared.weight"].shape[0]
    if sp.get_piece_size() > rows:
        raise CheckpointError(f"{spm}: {sp.get_piece_size()} pieces, but {mt5_dir}'s embedding has {rows} rows: "
                              "not this model's sentencepiece model")
    try:
        vocab = list(load_vocab(vocab_file))
    except UnicodeDecodeError:
        raise CheckpointError(f"{vocab_file}: not a UTF-8 text file (one token per line)") from None
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    try:
        plan = plan_transplant(vocab, sp)
    except ValueError as e:
        raise CheckpointError(f"{vocab_file}: {e}") from None
    for key in ("shared.weight", "lm_head.weight"):
        state[key] = plan.apply(state[key])
    try:
        config = config_fields_from_json(cfg, compat, False, {"vocab_size": len(plan.tokens)})
    except KeyError as e:
        raise CheckpointError(f"{config_file}: missing field {e.args[0]!r}") from None
    model = T5PegasusForConditionalGeneration(config)
    load_state(model, state, mt5_dir)
    return model.eval(), plan
