"""Prompt syntax and chunking: known answers derived by hand from ComfyUI's sd1_clip.py rules.

Token ids used below (CLIP BPE): a=320, cat=2368, dog=1929, ","=267, "("=263, ")"=264,
x=343, ":"=281, "1"=272, "."=269, "5"=276, bad=2103; start 49406, end 49407.
"""
from __future__ import annotations

import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ldm_core.errors import PromptError
from ldm_core.text.prompt_syntax import parse_weights, split_top_level, tokenize_with_weights
from ldm_core.text.tokenizer import ClipTokenizer

START, END = 49406, 49407
A, CAT, DOG, COMMA = 320, 2368, 1929, 267


@pytest.fixture(scope="module")
def tokenizer() -> ClipTokenizer:
    return ClipTokenizer()


def ids(chunk) -> list:
    return [item[0] for item in chunk]


def weights(chunk) -> list[float]:
    return [item[1] for item in chunk]


# --- weight syntax -------------------------------------------------------------------

WEIGHT_CASES = {
    "plain": ("a cat", [("a cat", 1.0)]),
    "explicit weight": ("(a:1.2)", [("a", 1.2)]),
    "emphasis": ("(a)", [("a", 1.0 * 1.1)]),
    "double emphasis": ("((a))", [("a", 1.0 * 1.1 * 1.1)]),  # 1.2100000000000002, as ComfyUI
    "mixed": ("x (a:1.5) y", [("x ", 1.0), ("a", 1.5), (" y", 1.0)]),
    # An explicit weight replaces the outer one instead of multiplying it: the outer group's
    # "1.5) b" does not parse as a float, so the outer group is x1.1, then "(a:1.5)" sets 1.5.
    "explicit inside emphasis": ("((a:1.5) b)", [("a", 1.5), (" b", 1.1)]),
    "explicit inside explicit": ("(a (b:0.5):1.2)", [("a ", 1.2), ("b", 0.5)]),
    "emphasis inside explicit": ("((a) b:2)", [("a", 2.0 * 1.1), (" b", 2.0)]),
    "escapes": ("\\(x\\)", [("(x)", 1.0)]),
    "escapes inside group": ("(\\(x\\):1.3)", [("(x)", 1.3)]),
    "escapes around group": ("\\((a)\\)", [("(", 1.0), ("a", 1.1), (")", 1.0)]),
    "backslash elsewhere is text": ("a\\b", [("a\\b", 1.0)]),
    "malformed weight": ("(a:bad)", [("a:bad", 1.1)]),
    "empty weight": ("(a:)", [("a:", 1.1)]),
    "colon first": ("(:1.5)", [(":1.5", 1.1)]),
    "last colon wins": ("(a:1.2:1.3)", [("a:1.2", 1.3)]),
    "float() spacing": ("(a: 1.5 )", [("a", 1.5)]),
    "float() exponent": ("(a:1e1)", [("a", 10.0)]),
    "negative weight": ("(a:-1)", [("a", -1.0)]),
    "empty prompt": ("", []),
    "empty group": ("()", []),
    "space group": ("( )", [(" ", 1.1)]),
    "unclosed": ("(a", [("(a", 1.0)]),
    "unclosed nested": ("((a)", [("(a", 1.1)]),  # ends in ")", so it still counts as a group
    "stray close": ("a)", [("a)", 1.0)]),
    # After a stray ")", the depth counter is negative and later groups stay literal text.
    "stray close then group": ("a) (b)", [("a) (b)", 1.0)]),
    "stray close then double group": ("a) ((b))", [("a) (", 1.0), ("b", 1.1), (")", 1.0)]),
    "explicit weight is not multiplied": ("((a:1.5))", [("a", 1.5)]),
    "group then stray close": ("(a))b(c)", [("a", 1.1), (")b(c)", 1.0)]),
}


@pytest.mark.parametrize("text, expected", WEIGHT_CASES.values(), ids=WEIGHT_CASES.keys())
def test_parse_weights_known_answers(text, expected):
    got = parse_weights(text)
    assert [segment for segment, _ in got] == [segment for segment, _ in expected]
    assert [weight for _, weight in got] == [weight for _, weight in expected]  # exact floats


def test_nan_and_inf_weights_pass_through_like_comfyui():
    (segment, weight), = parse_weights("(a:nan)")
    assert segment == "a" and weight != weight
    assert parse_weights("(a:inf)") == [("a", float("inf"))]


def test_deep_nesting_does_not_hit_recursion_limit():
    depth = 1100  # beyond the default recursion limit (1000), which ComfyUI hits
    (segment, weight), = parse_weights("(" * depth + "a" + ")" * depth)
    assert segment == "a" and weight == pytest.approx(1.1**depth, rel=1e-9)


def comfy_restatement(text: str, weight: float = 1.0) -> list[tuple[str, float]]:
    """ComfyUI's recursive rules restated independently (escapes handled by the caller)."""
    out = []
    for piece in split_top_level(text):
        if len(piece) < 2 or piece[0] != "(" or piece[-1] != ")":
            out.append((piece, weight))
            continue
        inner, inner_weight = piece[1:-1], weight * 1.1
        colon = inner.rfind(":")
        if colon > 0:
            try:
                inner, inner_weight = inner[:colon], float(inner[colon + 1 :])
            except ValueError:
                pass
        out += comfy_restatement(inner, inner_weight)
    return out


SYNTAX_TEXT = st.text(alphabet=st.sampled_from("ab (():)\\:1.5,x"), max_size=30)


@settings(max_examples=300, deadline=None)
@given(text=SYNTAX_TEXT)
def test_parse_weights_agrees_with_recursive_restatement(text):
    # Texts without backslashes: escapes are a pre/post substitution, tested above.
    text = text.replace("\\", "")
    got = parse_weights(text)
    expected = comfy_restatement(text)
    assert [s for s, _ in got] == [s for s, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected], nan_ok=True)


def test_split_top_level_known_answers():
    assert split_top_level("x (a) y") == ["x ", "(a)", " y"]
    assert split_top_level("((a)(b))c") == ["((a)(b))", "c"]
    assert split_top_level(")(") == [")("]
    assert split_top_level("") == []


# --- chunking -------------------------------------------------------------------------


def test_single_chunk_layout(tokenizer):
    chunks = tokenize_with_weights("a (cat:1.2)", tokenizer, pad_token=END)
    assert len(chunks) == 1 and len(chunks[0]) == 77
    assert chunks[0][:4] == [(START, 1.0), (A, 1.0), (CAT, 1.2), (END, 1.0)]
    assert chunks[0][4:] == [(END, 1.0)] * 73


def test_pad_token_zero_for_openclip(tokenizer):
    chunk, = tokenize_with_weights("a cat", tokenizer, pad_token=0)
    assert ids(chunk) == [START, A, CAT, END] + [0] * 73


@pytest.mark.parametrize("pad", [END, 0])
def test_empty_prompt_is_one_chunk(tokenizer, pad):
    chunk, = tokenize_with_weights("", tokenizer, pad_token=pad)
    assert ids(chunk) == [START, END] + [pad] * 75
    assert weights(chunk) == [1.0] * 77


def test_exactly_75_tokens_fit_in_one_chunk(tokenizer):
    chunk, = tokenize_with_weights(" ".join(["cat"] * 75), tokenizer, pad_token=0)
    assert ids(chunk) == [START] + [CAT] * 75 + [END]


def test_long_segment_is_split_across_chunks(tokenizer):
    # One weighted segment of 100 tokens: >= 8 tokens, so it may be split.
    chunks = tokenize_with_weights(" ".join(["cat"] * 100), tokenizer, pad_token=0)
    assert [len(c) for c in chunks] == [77, 77]
    assert ids(chunks[0]) == [START] + [CAT] * 75 + [END]
    assert ids(chunks[1]) == [START] + [CAT] * 25 + [END] + [0] * 50


def test_short_segment_moves_whole_to_next_chunk(tokenizer):
    # 70 cats, then a 6-token segment: 1 + 70 + 6 > 76, and 6 < 8, so it moves.
    text = "cat " * 70 + "(dog dog dog dog dog dog:1.2)"
    first, second = tokenize_with_weights(text, tokenizer, pad_token=0)
    assert ids(first) == [START] + [CAT] * 70 + [END] + [0] * 5
    assert ids(second) == [START] + [DOG] * 6 + [END] + [0] * 69
    assert weights(second)[1:7] == [1.2] * 6


def test_eight_token_segment_is_split(tokenizer):
    text = "cat " * 70 + "(dog dog dog dog dog dog dog dog:1.2)"
    first, second = tokenize_with_weights(text, tokenizer, pad_token=0)
    assert ids(first) == [START] + [CAT] * 70 + [DOG] * 5 + [END]
    assert ids(second) == [START] + [DOG] * 3 + [END] + [0] * 72


def test_words_inside_a_segment_are_not_units(tokenizer):
    # ComfyUI's "word" is a whole weighted segment: 74 cats and "dog dog" as one plain
    # segment of 76 tokens is split at the chunk boundary, between the two dogs.
    first, second = tokenize_with_weights("cat " * 74 + "dog dog", tokenizer, pad_token=END)
    assert ids(first)[-3:] == [CAT, DOG, END]
    assert ids(second)[:3] == [START, DOG, END]


def test_word_ids(tokenizer):
    chunk, = tokenize_with_weights("a (cat:1.2) dog", tokenizer, pad_token=0, return_word_ids=True)
    assert chunk[:5] == [(START, 1.0, 0), (A, 1.0, 1), (CAT, 1.2, 2), (DOG, 1.0, 3), (END, 1.0, 0)]
    assert all(item[2] == 0 for item in chunk[5:])


def test_disable_weights(tokenizer):
    chunk, = tokenize_with_weights("(cat:1.5) \\(x\\)", tokenizer, pad_token=0, disable_weights=True)
    assert ids(chunk)[:9] == [START, 263, CAT, 281, 272, 269, 276, 264, 263]
    assert set(weights(chunk)) == {1.0}


def test_rejects_bad_arguments(tokenizer):
    with pytest.raises(PromptError):
        tokenize_with_weights(None, tokenizer, pad_token=0)  # type: ignore[arg-type]
    with pytest.raises(PromptError):
        tokenize_with_weights("a", tokenizer, pad_token=0, max_length=8)


def test_other_max_length(tokenizer):
    chunks = tokenize_with_weights(" ".join(["cat"] * 10), tokenizer, pad_token=0, max_length=10)
    assert [ids(c) for c in chunks] == [[START] + [CAT] * 8 + [END], [START, CAT, CAT, END] + [0] * 6]


# --- embeddings -----------------------------------------------------------------------

EMBED = torch.arange(3 * 8, dtype=torch.float32).reshape(3, 8)
VECTOR = torch.ones(8)


class FakeEmbeddings:
    """Lookup that knows "three" ([3, D]) and "one" ([D]) and records the names asked for."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def __call__(self, name: str) -> torch.Tensor | None:
        self.asked.append(name)
        return {"three": EMBED, "one": VECTOR}.get(name)


def test_embedding_occupies_its_rows_with_weight(tokenizer):
    chunk, = tokenize_with_weights("a (embedding:three:1.3) cat", tokenizer, pad_token=0, embeddings=FakeEmbeddings())
    assert ids(chunk)[:2] == [START, A]
    for row, (token, weight) in enumerate(chunk[2:5]):
        assert isinstance(token, torch.Tensor) and torch.equal(token, EMBED[row]) and weight == 1.3
    assert ids(chunk)[5:7] == [CAT, END]
    assert len(chunk) == 77


def test_embedding_mid_segment_and_vector(tokenizer):
    lookup = FakeEmbeddings()
    chunk, = tokenize_with_weights(
        "a embedding:three cat embedding:one", tokenizer, pad_token=0, embeddings=lookup, return_word_ids=True
    )
    # Groups: "a", the 3 rows, "cat" (leftover of "three cat"), the vector.
    assert [item[2] for item in chunk[:8]] == [0, 1, 2, 2, 2, 3, 4, 0]
    assert torch.equal(chunk[4][0], EMBED[2]) and chunk[5][0] == CAT
    assert torch.equal(chunk[6][0], VECTOR)
    assert lookup.asked == ["three", "one"]


def test_embedding_trailing_comma_is_stripped_and_kept_as_text(tokenizer):
    lookup = FakeEmbeddings()
    chunk, = tokenize_with_weights("embedding:three, cat", tokenizer, pad_token=0, embeddings=lookup)
    assert lookup.asked == ["three,", "three"]
    assert all(torch.equal(chunk[1 + r][0], EMBED[r]) for r in range(3))
    assert ids(chunk)[4:7] == [COMMA, CAT, END]


def test_unknown_embedding_is_ignored_with_warning(tokenizer, caplog):
    with caplog.at_level(logging.WARNING, logger="ldm_core.prompt"):
        chunk, = tokenize_with_weights("a embedding:nope cat", tokenizer, pad_token=0, embeddings=FakeEmbeddings())
    assert ids(chunk)[:4] == [START, A, CAT, END]
    assert "embedding:nope cat does not exist" in caplog.text


def test_embedding_needs_space_or_newline_before_it(tokenizer):
    lookup = FakeEmbeddings()
    chunk, = tokenize_with_weights("a,embedding:three", tokenizer, pad_token=0, embeddings=lookup)
    assert lookup.asked == [] and all(isinstance(t, int) for t in ids(chunk))


def test_without_lookup_embedding_is_text(tokenizer):
    chunk, = tokenize_with_weights("embedding:three", tokenizer, pad_token=0)
    text_ids = tokenizer.encode("embedding:three")
    assert ids(chunk)[: len(text_ids) + 2] == [START, *text_ids, END]


def test_empty_embedding_name_is_ignored(tokenizer):
    lookup = FakeEmbeddings()
    chunk, = tokenize_with_weights("a embedding: ", tokenizer, pad_token=0, embeddings=lookup)
    assert ids(chunk)[:3] == [START, A, END] and lookup.asked == []


def test_embedding_of_wrong_rank_is_an_error(tokenizer):
    with pytest.raises(PromptError, match="shape"):
        tokenize_with_weights("embedding:x", tokenizer, pad_token=0, embeddings=lambda name: torch.zeros(1, 2, 8))


def test_long_embedding_is_split_like_a_long_word(tokenizer):
    big = torch.zeros(10, 8)
    text = "cat " * 70 + "embedding:big"
    first, second = tokenize_with_weights(text, tokenizer, pad_token=0, embeddings=lambda name: big)
    assert sum(isinstance(t, torch.Tensor) for t in ids(first)) == 5
    assert sum(isinstance(t, torch.Tensor) for t in ids(second)) == 5


# --- properties -----------------------------------------------------------------------

PROMPT_TEXT = st.lists(
    st.one_of(
        st.sampled_from(["(", ")", "\\", ":", ",", " ", "\n", "1.5", "embedding:", "embedding:three", "one,", "cat "]),
        st.characters(codec=None, exclude_categories=()),
    ),
    max_size=60,
).map("".join)


@settings(max_examples=200, deadline=None)
@given(text=PROMPT_TEXT, pad=st.sampled_from([0, END]), with_lookup=st.booleans())
def test_any_text_gives_well_formed_chunks(tokenizer, text, pad, with_lookup):
    lookup = FakeEmbeddings() if with_lookup else None
    chunks = tokenize_with_weights(text, tokenizer, pad_token=pad, embeddings=lookup, return_word_ids=True)
    assert len(chunks) >= 1
    for chunk in chunks:
        assert len(chunk) == 77
        assert chunk[0] == (START, 1.0, 0)
        content = [i for i, item in enumerate(chunk) if item[2] != 0]
        end_at = (content[-1] + 1) if content else 1
        assert chunk[end_at][0] == END  # the end token follows the last content token
        assert all(item[0] == pad for item in chunk[end_at + 1 :])


@settings(max_examples=100, deadline=None)
@given(n_words=st.integers(0, 400))
def test_many_words_keep_every_token_in_order(tokenizer, n_words):
    chunks = tokenize_with_weights(" ".join(["cat"] * n_words), tokenizer, pad_token=0)
    content = [t for chunk in chunks for t in ids(chunk) if t not in (START, END, 0)]
    assert content == [CAT] * n_words
    assert len(chunks) == max(1, -(-n_words // 75))
