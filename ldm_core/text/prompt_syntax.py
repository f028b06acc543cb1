"""ComfyUI's prompt syntax: weights in parentheses, textual-inversion embeddings, 77-token chunks.

The semantics are ComfyUI's (``comfy/sd1_clip.py``: ``token_weights``, ``SDTokenizer
.tokenize_with_weights``), quirks included, so a prompt means the same thing here:

- ``(text)`` multiplies the weight by 1.1, ``(text:1.3)`` sets it: the number after the
  *last* colon, read by Python's ``float`` (so ``inf``, ``nan``, ``1e1`` and surrounding
  spaces are accepted). If it does not parse, the colon and what follows stay in the text
  and the weight is x1.1. Nesting multiplies (``((a))`` is 1.1 x 1.1), but an explicit
  weight replaces the outer one (``((a:1.5))`` is 1.5).
- ``\\(`` and ``\\)`` are literal parentheses; nothing else is an escape.
- Unbalanced parentheses are not an error: an unclosed ``(`` keeps the rest literal,
  unless the rest happens to end in ``)`` (``((a)`` weights ``(a`` by 1.1); a stray ``)``
  takes the depth below zero, so the next ``(`` only brings it back to zero and stays text
  (``a) (b)`` is all literal, ``a) ((b))`` weights ``b``).
- ``embedding:name`` (at the start or after a space or newline) is looked up; the first
  whitespace-separated word is the name, the rest of the segment is tokenized as text.
  Without a lookup function it is ordinary text, as in ComfyUI without an embeddings folder.
- For chunking, ComfyUI's "word" is a whole weighted segment (an embedding and the text
  after it count separately), not a word: one of 8 or more tokens may be split across
  chunks, a shorter one moves whole to the next chunk.
"""
from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable

import torch

from ldm_core.errors import PromptError
from ldm_core.text.tokenizer import ClipTokenizer

logger = logging.getLogger(__name__)

Token = int | torch.Tensor
EmbeddingLookup = Callable[[str], "torch.Tensor | None"]

EMPHASIS = 1.1
MAX_WORD_LENGTH = 8  # segments at least this long may be split between chunks
EMBEDDING_PREFIX = "embedding:"
# ComfyUI only recognises the prefix at the start or after a single space or newline.
EMBEDDING_SPLIT = re.compile(f" {EMBEDDING_PREFIX}|\n{EMBEDDING_PREFIX}")

# Escaped parentheses are swapped for these placeholders while parsing and restored after.
# They are ComfyUI's own, so that text already holding them ("\0\1") reads the same.
ESCAPES = (("\\)", "\0\1"), ("\\(", "\0\2"))


def protect_escapes(text: str) -> str:
    """Replace ``\\)`` and ``\\(`` (in that order) by placeholders the parser ignores."""
    for escaped, placeholder in ESCAPES:
        text = text.replace(escaped, placeholder)
    return text


def restore_escapes(text: str) -> str:
    """Turn placeholders back into plain parentheses."""
    for escaped, placeholder in ESCAPES:
        text = text.replace(placeholder, escaped[1])
    return text


def split_top_level(text: str) -> list[str]:
    """Split text into runs of plain text and top-level ``( ... )`` groups, in order.

    Mirrors ComfyUI's depth counter exactly, including for unbalanced input: depth may go
    negative after a stray ``)``, and then ``(`` and ``)`` are kept inside plain runs.
    No returned piece is empty.
    """
    pieces: list[str] = []
    current = ""
    depth = 0
    for char in text:
        if char == "(" and depth == 0:
            if current:
                pieces.append(current)
            current = "("
            depth = 1
        elif char == "(":
            current += char
            depth += 1
        elif char == ")":
            depth -= 1
            if depth == 0:
                pieces.append(current + ")")
                current = ""
            else:
                current += char
        else:
            current += char
    if current:
        pieces.append(current)
    return pieces


def group_weight(inner: str, weight: float) -> tuple[str, float]:
    """Text and weight inside one ``( ... )`` group whose outer weight is ``weight``.

    ``inner`` is the group without its parentheses. A colon at position 0 never sets a
    weight (``(:2)`` is the text ":2" at ×1.1).
    """
    colon = inner.rfind(":")
    if colon > 0:
        try:
            return inner[:colon], float(inner[colon + 1 :])
        except ValueError:
            pass
    return inner, weight * EMPHASIS


def weight_problem(text: str) -> str | None:
    """What is wrong with a prompt's weights, None if nothing: for validation before any model is
    loaded. `parse_weights` passes a non-finite weight through as ComfyUI does, but (red:nan)
    makes every pixel NaN, a black picture; here it is named with what to write instead."""
    for segment, weight in parse_weights(text):
        if not math.isfinite(weight):
            return f"the weight of '({segment}:{weight})' is not a finite number; use a number such as ({segment}:1.2)"
    return None


def parse_weights(text: str) -> list[tuple[str, float]]:
    """Split a prompt into (text, weight) segments with ComfyUI's emphasis syntax.

    Segments come in prompt order with escapes already turned into ``(`` / ``)``; empty
    groups vanish, so ``""`` and ``"()"`` give ``[]``. Iterative, so deep nesting cannot
    hit Python's recursion limit.
    """
    out: list[tuple[str, float]] = []
    # Work stack of (text, weight, is_group_content); popped from the end, so each
    # expansion is pushed in reverse to keep prompt order.
    stack: list[tuple[str, float, bool]] = [(protect_escapes(text), 1.0, True)]
    while stack:
        chunk, weight, expand = stack.pop()
        if not expand:
            out.append((restore_escapes(chunk), weight))
            continue
        items = []
        for piece in split_top_level(chunk):
            # ComfyUI's test is on the ends only, so an unclosed "((a)" counts as a group.
            if len(piece) >= 2 and piece[0] == "(" and piece[-1] == ")":
                items.append((*group_weight(piece[1:-1], weight), True))
            else:
                items.append((piece, weight, False))
        stack.extend(reversed(items))
    return out


def split_embedding_words(segment: str) -> list[str]:
    """Split a segment before each embedding reference, dropping empty parts.

    ``"a embedding:x b"`` gives ``["a", "embedding:x b"]``: the space or newline before the
    prefix is consumed.
    """
    parts = EMBEDDING_SPLIT.split(segment)
    words = parts[:1] + [EMBEDDING_PREFIX + part for part in parts[1:]]
    return [word for word in words if word]


def embedding_vectors(embed: object, name: str) -> list[torch.Tensor]:
    """Rows of an embedding returned by the lookup: [n, D] gives n vectors, [D] one."""
    if not isinstance(embed, torch.Tensor) or embed.dim() not in (1, 2):
        shape = tuple(embed.shape) if isinstance(embed, torch.Tensor) else type(embed).__name__
        raise PromptError(
            f"embedding {name!r} must be a tensor of shape [n, D] or [D], got {shape}; "
            "fix the embeddings lookup"
        )
    return [embed] if embed.dim() == 1 else list(embed.unbind(0))


def find_embedding(reference: str, lookup: EmbeddingLookup) -> tuple[torch.Tensor | None, str, str]:
    """Resolve ``name rest...`` (the text after ``embedding:``) like ComfyUI.

    Returns (embedding or None, name tried, leftover text to tokenize). When the name is
    not found but ends in commas (``embedding:foo,``), the name without the commas is
    tried and the commas go back into the leftover text, so they still become tokens.
    """
    words = reference.split()
    if not words:  # "embedding:" with no name; ComfyUI raises IndexError here
        return None, "", ""
    name, leftover = words[0], " ".join(words[1:])
    embed = lookup(name)
    if embed is None:
        stripped = name.strip(",")
        if len(stripped) < len(name):
            # ComfyUI cuts by length, so with leading commas the "commas" put back are the
            # name's tail (",a," gives leftover "a,"); kept, it decides the tokens produced.
            # Unlike ComfyUI, an all-comma name is not looked up as "".
            embed = lookup(stripped) if stripped else None
            leftover = f"{name[len(stripped):]} {leftover}"
    return embed, name, leftover


def segment_groups(
    segment: str, weight: float, tokenizer: ClipTokenizer, lookup: EmbeddingLookup | None
) -> list[list[tuple[Token, float]]]:
    """Token groups of one weighted segment: one per text run, one per embedding found."""
    groups: list[list[tuple[Token, float]]] = []
    for word in split_embedding_words(segment):
        if lookup is not None and word.startswith(EMBEDDING_PREFIX):
            reference = word[len(EMBEDDING_PREFIX) :].strip("\n")
            embed, name, leftover = find_embedding(reference, lookup)
            if embed is None:
                logger.warning("embedding:%s does not exist, ignoring", reference)
            else:
                groups.append([(vector, weight) for vector in embedding_vectors(embed, name)])
            if not leftover:
                continue
            word = leftover
        groups.append([(token, weight) for token in tokenizer.encode(word)])
    return groups


def chunk_groups(
    groups: list[list[tuple[Token, float]]], *, start: int, end: int, pad_token: int, max_length: int
) -> list[list[tuple[Token, float, int]]]:
    """Pack token groups into chunks of exactly ``max_length`` (start, ≤ max_length-2 tokens, end, pad).

    A group that does not fit in the current chunk is split if it has at least
    MAX_WORD_LENGTH tokens, else the chunk is closed (end token, padding) and the group
    starts the next one. Items are (token, weight, word id); word id i+1 for group i, 0 for
    start, end and padding.
    """
    chunk: list[tuple[Token, float, int]] = [(start, 1.0, 0)]
    chunks = [chunk]
    limit = max_length - 1  # room left for the end token
    for i, group in enumerate(groups):
        may_split = len(group) >= MAX_WORD_LENGTH
        rest = [(token, weight, i + 1) for token, weight in group]
        while rest:
            if len(chunk) + len(rest) <= limit:
                chunk += rest
                break
            room = limit - len(chunk)
            if may_split:
                chunk += rest[:room]
                chunk.append((end, 1.0, 0))
                rest = rest[room:]
            else:
                chunk.append((end, 1.0, 0))
                chunk += [(pad_token, 1.0, 0)] * room
            chunk = [(start, 1.0, 0)]
            chunks.append(chunk)
    chunk.append((end, 1.0, 0))
    chunk += [(pad_token, 1.0, 0)] * (max_length - len(chunk))
    return chunks


def tokenize_with_weights(
    text: str,
    tokenizer: ClipTokenizer,
    *,
    pad_token: int,
    max_length: int = 77,
    embeddings: EmbeddingLookup | None = None,
    return_word_ids: bool = False,
    disable_weights: bool = False,
) -> list[list[tuple[Token, float]]] | list[list[tuple[Token, float, int]]]:
    """Tokenize a prompt into CLIP-sized chunks of (token, weight[, word id]), as ComfyUI does.

    Args:
        text: the prompt, in ComfyUI's syntax (see the module docstring).
        tokenizer: the CLIP tokenizer; its bos/eos start and end every chunk.
        pad_token: 49407 (end token) for OpenAI CLIP-L, 0 for OpenCLIP encoders.
        max_length: items per chunk, 77 for CLIP.
        embeddings: ``name -> tensor [n, D] or [D] | None``; without it ``embedding:x``
            is plain text. A found embedding adds n positions whose token is a 1-D tensor.
        return_word_ids: add a third item per position: 0 for start/end/pad, else 1 + the
            index of the segment or embedding it came from.
        disable_weights: no emphasis syntax: parentheses are text, all weights 1.0
            (``\\(`` still becomes ``(``, as in ComfyUI).

    Returns:
        A non-empty list of chunks, each exactly ``max_length`` items long.
    """
    if not isinstance(text, str):
        raise PromptError(f"a prompt must be a str, got {type(text).__name__}")
    if max_length < MAX_WORD_LENGTH + 1:
        # Shorter chunks cannot hold a whole unsplittable group, and ComfyUI loops forever.
        raise PromptError(f"max_length must be at least {MAX_WORD_LENGTH + 1}, got {max_length}")
    # ComfyUI still consumes the backslash of "\(" when weights are disabled.
    segments = [(restore_escapes(protect_escapes(text)), 1.0)] if disable_weights else parse_weights(text)
    groups = [group for segment, weight in segments for group in segment_groups(segment, weight, tokenizer, embeddings)]
    chunks = chunk_groups(groups, start=tokenizer.bos, end=tokenizer.eos, pad_token=pad_token, max_length=max_length)
    if return_word_ids:
        return chunks
    return [[(token, weight) for token, weight, _ in chunk] for chunk in chunks]
