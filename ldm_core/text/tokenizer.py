"""CLIP's byte-level BPE tokenizer, offline, matching transformers' pure-python CLIPTokenizer.

The reference is transformers' slow ``CLIPTokenizer`` (4.x) as ComfyUI builds it from
``comfy/sd1_tokenizer``, running *without* ftfy installed, which is how ComfyUI ships.
Without ftfy that tokenizer normalises text in this order:

1. the exact (case-sensitive) strings ``<|startoftext|>`` / ``<|endoftext|>`` are split out
   as their ids; ``do_lower_case`` in ComfyUI's tokenizer config has no effect here, the
   slow CLIP tokenizer never reads it;
2. each remaining piece goes through BERT's BasicTokenizer with accents kept and no
   punctuation splitting: NUL, U+FFFD and every ``C*`` category character are dropped
   (tab, CR, LF and ``Zs`` spaces become spaces), CJK ideographs get spaces around them,
   NFC, split on whitespace, each word lowercased as a whole (so a word-final capital
   sigma becomes ``ς``), rejoined by single spaces;
3. CLIP's pre-tokenizer regex, then byte-level BPE on the UTF-8 bytes of each match.

The transformers 5 ``CLIPTokenizer`` (backed by the ``tokenizers`` library) only does NFC,
whitespace collapsing and per-character lowercasing before the regex, so it differs on
control and format characters, CJK next to other characters, U+FFFD, word-final sigma,
specials glued to punctuation and a few more; ``tests/test_tokenizer.py`` lists the
measured differences.
"""
from __future__ import annotations

import gzip
import os
import unicodedata
from collections.abc import Sequence
from pathlib import Path

import regex

from ldm_core.errors import PromptError

DEFAULT_VOCAB_PATH = Path(__file__).resolve().parents[1] / "data" / "bpe_simple_vocab_16e6.txt.gz"

BOS_TEXT = "<|startoftext|>"
EOS_TEXT = "<|endoftext|>"
END_OF_WORD = "</w>"

# CLIP keeps the first 49152 - 256 - 2 merges of the file (line 0 is a header): with
# 2 * 256 byte symbols and the two special tokens that makes a 49408-entry vocabulary.
N_MERGES = 49152 - 256 - 2

# CLIP's pre-tokenizer (OpenAI's simple_tokenizer). IGNORECASE matters even on lowercased
# text: e.g. "'ſ" (long s) still matches the "'s" contraction.
PRETOKENIZE_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
SPECIALS_PATTERN = regex.compile(r"<\|startoftext\|>|<\|endoftext\|>")

# Code point ranges BERT's BasicTokenizer calls "Chinese characters" (CJK ideographs only;
# Hangul, kana and CJK punctuation are not included).
CJK_RANGES = (
    (0x4E00, 0x9FFF),
    (0x3400, 0x4DBF),
    (0x20000, 0x2A6DF),
    (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F),
    (0x2B820, 0x2CEAF),
    (0xF900, 0xFAFF),
    (0x2F800, 0x2FA1F),
)

BPE_CACHE_LIMIT = 100_000


def bytes_to_unicode() -> dict[int, str]:
    """Map each of the 256 byte values to a printable character (GPT-2's reversible scheme).

    Printable Latin-1 bytes map to themselves; the other 68 (controls, space, soft hyphen...)
    map to U+0100 onwards in byte order, so BPE never sees whitespace or control characters.
    The printable bytes come first, then the others, as in CLIP's vocabulary.
    """
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in printable}
    others = (b for b in range(256) if b not in table)
    for offset, b in enumerate(others):
        table[b] = chr(256 + offset)
    # Insertion order matters: it is the order of the first 256 vocabulary entries.
    return table


def load_merges(vocab_path: str | os.PathLike) -> list[tuple[str, str]]:
    """Read CLIP's merge list from the gzipped ``bpe_simple_vocab`` file.

    Returns the N_MERGES merges in rank order, each as its (left, right) pair.
    """
    try:
        with gzip.open(vocab_path, "rb") as f:
            # Only the header and the merges CLIP uses: the file has 213k more lines.
            lines = f.read().decode("utf-8").split("\n", N_MERGES + 1)
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise PromptError(
            f"cannot read the CLIP BPE vocabulary {vocab_path!s}: {e}; "
            "pass the bpe_simple_vocab_16e6.txt.gz shipped with ldm_core"
        ) from e
    merges = [tuple(line.split(" ")) for line in lines[1 : N_MERGES + 1]]
    if len(merges) != N_MERGES or any(len(m) != 2 for m in merges):
        raise PromptError(
            f"{vocab_path!s} is not a CLIP BPE merges file: expected {N_MERGES} 'a b' lines "
            "after the header; pass the bpe_simple_vocab_16e6.txt.gz shipped with ldm_core"
        )
    return merges  # type: ignore[return-value]


def build_vocab(merges: Sequence[tuple[str, str]], byte_chars: Sequence[str]) -> dict[str, int]:
    """The CLIP vocabulary: byte chars, byte chars + ``</w>``, one token per merge, then BOS, EOS."""
    tokens = [*byte_chars, *(c + END_OF_WORD for c in byte_chars), *(a + b for a, b in merges)]
    tokens += [BOS_TEXT, EOS_TEXT]
    return {token: i for i, token in enumerate(tokens)}


def is_cjk(char: str) -> bool:
    """True for the CJK ideographs that BasicTokenizer isolates with spaces."""
    cp = ord(char)
    return any(lo <= cp <= hi for lo, hi in CJK_RANGES)


def clean_piece(text: str) -> str:
    """BasicTokenizer's cleanup of one piece: drop controls, space out CJK, NFC, lowercase.

    Returns the words joined by single spaces, no leading or trailing space.
    """
    chars = []
    for char in text:
        if char in " \t\n\r" or unicodedata.category(char) == "Zs":
            chars.append(" ")
        elif char == "\ufffd" or unicodedata.category(char).startswith("C"):
            continue  # NUL, other controls, format chars (ZWJ, BOM...), unassigned, private use
        elif is_cjk(char):
            chars.append(f" {char} ")
        else:
            chars.append(char)
    # NFC comes after cleanup, so a dropped control char between a base and its combining
    # mark lets them compose. Lowercasing whole words (not characters) gives final sigma ς.
    words = unicodedata.normalize("NFC", "".join(chars)).split()
    return " ".join(word.lower() for word in words)


class ClipTokenizer:
    """CLIP BPE tokenizer (SD1 CLIP-L, SD2/SDXL OpenCLIP share the same vocabulary).

    ``encode`` gives ids without BOS/EOS; calling the tokenizer adds them, like transformers'
    ``input_ids``. Results of BPE are cached per instance, per word.
    """

    bos: int = 49406
    eos: int = 49407
    vocab_size: int = 49408

    def __init__(self, vocab_path: str | os.PathLike | None = None) -> None:
        merges = load_merges(DEFAULT_VOCAB_PATH if vocab_path is None else vocab_path)
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.encoder = build_vocab(merges, list(self.byte_encoder.values()))
        self.decoder = {i: token for token, i in self.encoder.items()}
        self.bpe_ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.special_ids = {BOS_TEXT: self.encoder[BOS_TEXT], EOS_TEXT: self.encoder[EOS_TEXT]}
        self._bpe_cache: dict[str, tuple[int, ...]] = {}

    def __call__(self, text: str) -> list[int]:
        """[bos] + encode(text) + [eos]."""
        return [self.bos, *self.encode(text), self.eos]

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without BOS/EOS."""
        if not isinstance(text, str):
            raise PromptError(f"a prompt must be a str, got {type(text).__name__}")
        ids: list[int] = []
        start = 0
        for special in SPECIALS_PATTERN.finditer(text):
            ids += self._encode_piece(text[start : special.start()])
            ids.append(self.special_ids[special.group()])
            start = special.end()
        ids += self._encode_piece(text[start:])
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids; word ends become spaces, invalid UTF-8 becomes U+FFFD.

        BOS/EOS are rendered as their text. Meant for display and debugging: the text
        re-encodes to the same ids only for text the tokenizer does not normalise.
        """
        tokens = []
        for i in ids:
            token = self.decoder.get(int(i))
            if token is None:
                raise PromptError(f"token id {i} is outside the CLIP vocabulary (0..{self.vocab_size - 1})")
            tokens.append(token)
        data = bytearray()
        for token in tokens:
            if token in self.special_ids:
                data += token.encode("utf-8")
                continue
            word_end = token.endswith(END_OF_WORD)
            data += bytes(self.byte_decoder[c] for c in token.removesuffix(END_OF_WORD))
            data += b" " if word_end else b""
        return data.decode("utf-8", errors="replace").strip()

    def _encode_piece(self, piece: str) -> list[int]:
        """Ids of a piece that holds no exact special-token string, cleaned up on its own."""
        ids: list[int] = []
        for match in PRETOKENIZE_PATTERN.finditer(clean_piece(piece)):
            word = match.group()
            # Cleanup and lowercasing can form a special token ("<|ENDOFTEXT|>",
            # "<|end\x00oftext|>"); the reference maps it to the special id, not to BPE pieces.
            special = self.special_ids.get(word)
            ids += [special] if special is not None else self._bpe_ids(word)
        return ids

    def _bpe_ids(self, word: str) -> tuple[int, ...]:
        """Vocabulary ids of one pre-tokenized word, via its UTF-8 bytes and BPE. Cached."""
        cached = self._bpe_cache.get(word)
        if cached is None:
            symbols = [self.byte_encoder[b] for b in word.encode("utf-8")]
            symbols[-1] += END_OF_WORD
            cached = tuple(self.encoder[s] for s in bpe_merge(symbols, self.bpe_ranks))
            if len(self._bpe_cache) >= BPE_CACHE_LIMIT:
                self._bpe_cache.clear()  # bound memory in long-running processes
            self._bpe_cache[word] = cached
        return cached


def bpe_merge(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply merges to a word until none applies (Sennrich et al. 2016, CLIP's variant).

    Each round takes the adjacent pair with the lowest rank and merges every occurrence of
    it, left to right without overlap ("a a a" with merge "a a" gives "aa a").
    """
    while len(symbols) > 1:
        pairs = {(a, b) for a, b in zip(symbols, symbols[1:])}
        best = min(pairs, key=lambda pair: ranks.get(pair, N_MERGES))
        if best not in ranks:
            break
        merged: list[str] = []
        i = 0
        while i < len(symbols):
            if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols
