"""A byte-level tokenizer built locally, so the built-in models need no downloads.

Ids: 0 ``<pad>``, 1 ``<bos>``, 2 ``<eos>``, 3 ``<unk>``, then byte ``b`` is id ``b + 4`` (vocabulary 260).
It is a real ``transformers`` fast tokenizer (``tokenizers`` BPE with no merges over the GPT-2 byte alphabet),
so ``save_pretrained`` writes files that ``AutoTokenizer.from_pretrained`` reads back offline; encoding with
``add_special_tokens=True`` prepends ``<bos>``.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any, Sequence

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(4)
BYTE_OFFSET = len(SPECIAL_TOKENS)
BYTE_VOCAB_SIZE = BYTE_OFFSET + 256


def _byte_alphabet() -> dict[int, str]:
    """The reversible byte → printable-character map used by byte-level BPE tokenizers."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def build_byte_tokenizer():
    """A ``PreTrainedTokenizerFast`` with 4 special tokens and one id per byte."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for b, ch in sorted(_byte_alphabet().items()):
        vocab[ch] = BYTE_OFFSET + b
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", BOS_ID)])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
        padding_side="right")
    return tok


@lru_cache(maxsize=1)
def _cached_byte_tokenizer():
    return build_byte_tokenizer()


class TokenizerAdapter:
    """The few tokenizer operations the engine needs, over any ``transformers`` tokenizer.

    ``encode(text, add_special_tokens=True)`` is how every prompt or full text is tokenized (so a sampled
    continuation and a training batch built from the same text agree); a response appended to a prompt is
    encoded with ``add_special_tokens=False``.
    """

    def __init__(self, tokenizer: Any):
        self.hf = tokenizer
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        self.pad_token_id: int = int(pad)
        self.eos_token_id: int | None = tokenizer.eos_token_id
        self.bos_token_id: int | None = tokenizer.bos_token_id

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def __len__(self) -> int:
        return len(self.hf)

    def save_pretrained(self, path: str) -> None:
        self.hf.save_pretrained(path)


def byte_tokenizer() -> TokenizerAdapter:
    """The built-in byte tokenizer (shared, immutable)."""
    return TokenizerAdapter(_cached_byte_tokenizer())
