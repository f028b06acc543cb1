"""ClipTokenizer: identical ids to transformers' CLIP tokenizers built from the same .gz file.

The reference is transformers' slow, pure-python ``CLIPTokenizer`` without ftfy (what
ComfyUI runs with transformers 4.x). transformers 5 removed it, so its ids for the corpus
below are recorded in ``data/clip_tokenizer_reference.json``; regenerate them with a
transformers 4.x interpreter that has no ftfy (plus pytest, hypothesis, regex):

    python tests/test_tokenizer.py --regenerate

Where a slow tokenizer is installed, the live one is compared too. The tokenizers-backed
CLIP tokenizer (``CLIPTokenizerFast`` in 4.x, ``CLIPTokenizer`` in 5.x) is compared on every
prompt where the recorded slow and fast ids agree. They disagree (measured with 4.57.6,
and 5.23 agrees with 4.57.6's fast one) because the fast one lacks BasicTokenizer:
- control/format characters (NUL, ESC, ZWSP, ZWJ, BOM, soft hyphen...), U+FFFD and lone
  surrogates are dropped by slow, byte-encoded by fast (fast rejects lone surrogates);
- CJK ideographs get spaces around them in slow, so "a猫b" is three words there;
- slow lowercases whole words (word-final Σ → ς), fast per character (Σ → σ);
- slow splits out only the exact lowercase "<|endoftext|>" before its regex, so
  "!<|ENDOFTEXT|>" is BPE'd as text; fast lowercases first and finds the special token;
- "'ſ" is a contraction to slow's case-insensitive regex, not to fast's;
- transformers 5's fast one also BPEs "<|ENDOFTEXT|>" (any case but lower) as text where
  4.x (slow and fast) gives the special id: it matches special tokens before lowercasing;
- slow splits on U+2028/U+2029 and Zs spaces only after its control filter, and so on.
We follow the slow one.
"""
from __future__ import annotations

import gzip
import json
import random
import re
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ldm_core.errors import PromptError
from ldm_core.text.tokenizer import DEFAULT_VOCAB_PATH, ClipTokenizer

REFERENCE_PATH = Path(__file__).parents[1] / "data" / "clip_tokenizer_reference.json"
RECASED_SPECIAL = re.compile(r"<\|(?:start|end)oftext\|>", re.IGNORECASE)

HANDWRITTEN = [
    "",
    " ",
    "a photo of a cat",
    "A Photo Of A CAT",
    "masterpiece, best quality, 1girl, solo, looking at viewer",
    "(masterpiece:1.2), ((best quality)), [worst quality], \\(escaped\\)",
    "embedding:EasyNegative, lowres, bad anatomy",
    "hello,world;foo:bar|baz/qux\\quux",
    "!!!??? ... --- *** ### @@@ $$$ %%% ^^^ &&& ~~~ `` ''",
    "3.14159 1.5 1,000 1,000,000 -2e10 0x1F 007 ½ ² ³ ⅷ ٣ ５",
    "1girl 2boys 4k 8k uhd 16:9 1920x1080 f/1.8 50mm",
    "café naïve résumé Ångström Zürich São Paulo jalapeño",
    "cafe\u0301 nai\u0308ve A\u030angstro\u0308m",  # decomposed accents: NFC composes them
    "ÀÉÎÕÜ àéîõü ÇÑ çñ Œ œ Æ æ Ø ø ß ẞ",
    "ΟΔΟΣ ΣΑΣ Σ σς Ελληνικά",
    "İstanbul IŞIK ı i̇ ǅ ǈ ǋ ﬁ ﬂ ﬀ",
    "Привет мир, ПРИВЕТ",
    "東京タワー 日本語のテキスト 富士山",
    "a猫b 猫cat 中文English混合 漢字",
    "한국어 텍스트 서울",
    "ภาษาไทย العربية עברית हिन्दी",
    "👍 👍🏽 👨‍👩‍👧 🇯🇵 ❤️ ❤ ✨🔥💯 🐱‍👤",
    "emoji🙂inside🙃words",
    "tab\tseparated\tvalues",
    "new\nline\r\nand\rreturns",
    "many     spaces   here",
    "  leading and trailing  ",
    "nbsp\u00a0here ideographic\u3000space en\u2002space",
    "line\u2028separator para\u2029graph",
    "zero\u200bwidth\u200cnon\u200djoiner\ufeffbom soft\u00adhyphen",
    "nul\x00byte bell\x07 esc\x1b[31mred\x1b[0m del\x7f",
    "\x01\x02\x03\x04\x05\x06\x0e\x0f\x10\x1c\x1d\x1e\x1f\x85",
    "replacement \ufffd char and private \ue000 use",
    "lone \ud800 surrogate \udfff here",
    "don't can't won't it's I'm we're they've you'll he'd",
    "DON'T CAN'T IT'S I'M WE'RE THEY'VE YOU'LL HE'D",
    "rock'n'roll o'clock 'quoted' ''double'' ’curly’ it’s",
    "'s 't 're 've 'm 'll 'd 'ſ 'S",
    "&amp; &lt;b&gt;bold&lt;/b&gt; &quot;q&quot; &#39; &#x27; &nbsp;",
    "<b>html</b> <i>tags</i> <br/>",
    "HeLLo WoRLD MiXeD CaSe iPhone McDonald's",
    "<|startoftext|>",
    "<|endoftext|>",
    "a<|endoftext|>b",
    "!<|endoftext|>!",
    "<|ENDOFTEXT|>",
    "!<|ENDOFTEXT|>",
    "<|end\x00oftext|>",
    "<|startoftext|> hello <|endoftext|> world <|startoftext|>",
    "<|ſtartoftext|>",
    "https://example.com/path?query=1&b=2#frag",
    "user@example.com #hashtag @mention",
    "snake_case kebab-case camelCase PascalCase CONSTANT_CASE",
    "supercalifragilisticexpialidocious pneumonoultramicroscopicsilicovolcanoconiosis",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "abababababababababababababab",
    "ＡＢＣ１２３ｘｙｚ fullwidth",
    "°C ±5 µm ×2 ÷3 → ← ⇒ ∞ ≈ ≠ ≤ ≥ √ ∑ π",
    "©®™ §¶ †‡ • … ‰ ′ ″",
    "“double” ‘single’ «guillemets» „low“ 「brackets」 『double』",
    "— – ‐ ‑ ‒ ― dashes",
    "\u0301\u0302 leading combining marks",
    "x\u0301\u0327\u0308 stacked",
    "𝔉𝔯𝔞𝔨𝔱𝔲𝔯 𝐛𝐨𝐥𝐝 𝓈𝒸𝓇𝒾𝓅𝓉",
    "Ⅻ Ⅳ ⅳ roman numerals",
    "a" * 300,
    " ".join(["word"] * 200),
    "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
    "12345678901234567890",
    "...,,,;;;:::!!!",
    "(",
    ")",
    "((((",
    "a\\b\\\\c",
    "\\(\\)",
    "'''",
    "'",
    "''s",
    "a'b'c'd",
    "x'S Y'LL z'D",
]

# Fragments on which slow and fast tokenizers agree, and ones known to split them.
FRAGMENTS = [
    "a photo of", "portrait", "landscape", "cat", "dog", "1girl", "best quality", "masterpiece",
    "(red hair:1.2)", "((blue eyes))", "[bad]", "\\(literal\\)", "embedding:foo", "8k", "4K UHD",
    "f/2.8", "35mm", "1.5", "1,000", "100%", "$5", "café", "naïve", "Ålesund", "한국", "Ελλάδα",
    "Москва", "🎨", "👍🏽", "🇫🇷", "don't", "it's", "I'M", "&amp;", "&lt;", "<|endoftext|>", "\t",
    "\n", "\r\n", "  ", "\u00a0", "\u3000", "'s", "O'Brien", "x-ray", "e-mail", "U.S.A.", "Mr.",
    "etc...", "?!", "ΣΟΦΙΑ", "İ", "ß", "ﬁ", "Ⅻ", "①", "ǅ", "\u0301", "a\u0308", "¿qué?", "¡sí!",
]
EXOTIC_FRAGMENTS = [
    "東京", "猫", "\x00", "\x1b", "\u200b", "\ufeff", "\u00ad", "\ufffd", "👨\u200d👩\u200d👧",
    "ΟΔΟΣ", "!<|ENDOFTEXT|>", "'ſ", "\u2028",
]
SEPARATORS = [" ", ", ", ",", "  ", "\t", "\n", " \n ", "", "-", "_", ". ", " | ", ";"]
CHAR_POOL = (
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    " !\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~\t\n\r"
    "àáâãäåæçèéêëìíîïñòóôõöøùúûüýÿßÀÉÎÕÜŒœ"
    "ΑΒΓΔΣσςαβγ" "абвгдАБВГД" "猫犬日本中文字" "ひらがなカタカナ" "한국어"
    "🙂🎨👍🏽❤️✨" "\u0300\u0301\u0308\u0327" "\x00\x07\x1b\x7f\x85\u200b\u200d\ufeff\u00ad\ufffd"
    "\u00a0\u2002\u3000\u2028" "½²①Ⅻ٣５" "“”‘’«»—…°±×"
)


def build_corpus() -> list[str]:
    """At least 200 prompts: hand-picked edge cases, then seeded random mixes."""
    rng = random.Random(20240611)

    def mix(n_parts: int, exotic_share: float) -> str:
        text = ""
        for k in range(n_parts):
            pool = EXOTIC_FRAGMENTS if rng.random() < exotic_share else FRAGMENTS
            text += (rng.choice(SEPARATORS) if k else "") + rng.choice(pool)
        return text.upper() if rng.random() < 0.1 else text

    prompts = list(HANDWRITTEN)
    prompts += [mix(rng.randint(1, 30), 0.0) for _ in range(120)]
    prompts += [mix(rng.randint(1, 30), 0.2) for _ in range(40)]
    prompts += ["".join(rng.choice(CHAR_POOL) for _ in range(rng.randint(1, 60))) for _ in range(60)]
    prompts += [mix(rng.randint(150, 250), 0.0) for _ in range(3)]  # several chunks' worth
    return prompts


def write_hf_files(gz_path: Path, out_dir: Path) -> Path:
    """vocab.json, merges.txt and ComfyUI's sd1_tokenizer config, derived from the .gz.

    Written independently of ldm_core.tokenizer so that a shared bug cannot hide.
    """
    with gzip.open(gz_path, "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1 : 49152 - 256 - 2 + 1]
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    remapped = [b for b in range(256) if b not in printable]
    byte_chars = [chr(b) for b in printable] + [chr(256 + i) for i in range(len(remapped))]
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + [m.replace(" ", "") for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = {  # comfy/sd1_tokenizer/tokenizer_config.json, minus the hub path
        "add_prefix_space": False, "bos_token": "<|startoftext|>", "do_lower_case": True,
        "eos_token": "<|endoftext|>", "errors": "replace", "model_max_length": 8192,
        "pad_token": "<|endoftext|>", "tokenizer_class": "CLIPTokenizer", "unk_token": "<|endoftext|>",
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return out_dir


def has_recased_special(text: str) -> bool:
    """True if text holds "<|endoftext|>"/"<|startoftext|>" in other than lowercase.

    transformers 5's fast CLIPTokenizer BPEs those as text; 4.x's fast and slow ones give
    the special id (the slow one unless punctuation is glued in front).
    """
    return any(m.group() not in ("<|startoftext|>", "<|endoftext|>") for m in RECASED_SPECIAL.finditer(text))


def hf_ids(hf_tokenizer, text: str) -> list[int] | None:
    """input_ids from a transformers tokenizer, or None where it refuses the text."""
    try:
        return list(hf_tokenizer(text)["input_ids"])
    except Exception:  # the Rust tokenizer rejects lone surrogates
        return None


def slow_clip_class():
    """transformers' pure-python CLIP tokenizer class, or None (removed in transformers 5)."""
    import transformers
    from transformers import PreTrainedTokenizer

    cls = getattr(transformers, "CLIPTokenizer", None)
    return cls if cls is not None and issubclass(cls, PreTrainedTokenizer) else None


def fast_clip_class():
    """The tokenizers-backed CLIP tokenizer class of whichever transformers is installed."""
    import transformers

    if slow_clip_class() is not None:
        return transformers.CLIPTokenizerFast
    return transformers.CLIPTokenizer


@pytest.fixture(scope="module")
def tokenizer() -> ClipTokenizer:
    return ClipTokenizer()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return write_hf_files(DEFAULT_VOCAB_PATH, tmp_path_factory.mktemp("clip_tokenizer"))


@pytest.fixture(scope="module")
def reference() -> list[dict]:
    return json.loads(REFERENCE_PATH.read_text(encoding="utf-8"))["prompts"]


@pytest.fixture(scope="module")
def fast_reference(hf_dir):
    pytest.importorskip("transformers")
    return fast_clip_class().from_pretrained(str(hf_dir))


def test_vocabulary_matches_independent_vocab_json(tokenizer, hf_dir):
    vocab = json.loads((hf_dir / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == tokenizer.vocab_size == 49408
    assert tokenizer.encoder == vocab
    assert vocab["<|startoftext|>"] == tokenizer.bos and vocab["<|endoftext|>"] == tokenizer.eos


def test_known_ids(tokenizer):
    # Widely published CLIP ids (e.g. diffusers docs / SD prompts).
    assert tokenizer("a photo of a cat") == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tokenizer("") == [49406, 49407]
    assert tokenizer.encode("A Photo Of A CAT") == [320, 1125, 539, 320, 2368]
    assert tokenizer.encode("<|endoftext|>") == [49407]


def test_recorded_corpus_is_this_corpus(reference):
    corpus = build_corpus()
    assert len(corpus) >= 200
    assert [entry["text"] for entry in reference] == corpus, "corpus changed: regenerate the reference"


def test_matches_recorded_slow_tokenizer(tokenizer, reference):
    mismatches = [e["text"] for e in reference if tokenizer(e["text"]) != e["slow"]]
    assert not mismatches, f"{len(mismatches)}/{len(reference)} prompts differ, e.g. {mismatches[:3]!r}"


def test_matches_installed_slow_tokenizer(tokenizer, hf_dir):
    pytest.importorskip("transformers")
    cls = slow_clip_class()
    if cls is None:
        pytest.skip("this transformers has no pure-python CLIPTokenizer (removed in 5.x)")
    slow = cls.from_pretrained(str(hf_dir))
    if getattr(slow, "fix_text", None) is not None:
        pytest.skip("ftfy is installed, so the slow tokenizer does not behave as in ComfyUI")
    mismatches = [text for text in build_corpus() if tokenizer(text) != hf_ids(slow, text)]
    assert not mismatches, f"{len(mismatches)} prompts differ, e.g. {mismatches[:3]!r}"


def test_matches_fast_tokenizer_where_slow_and_fast_agree(tokenizer, reference, fast_reference):
    agreeing = [e for e in reference if e["fast"] == e["slow"] and not has_recased_special(e["text"])]
    assert len(agreeing) >= 150
    mismatches = [e["text"] for e in agreeing if tokenizer(e["text"]) != hf_ids(fast_reference, e["text"])]
    assert not mismatches, f"{len(mismatches)}/{len(agreeing)} prompts differ, e.g. {mismatches[:3]!r}"


def test_installed_fast_tokenizer_still_disagrees_only_where_recorded(reference, fast_reference):
    # Guards the previous test: if a new transformers changed the fast tokenizer, the
    # recorded split into agreeing/disagreeing prompts would no longer be trustworthy.
    changed = [
        e["text"]
        for e in reference
        if e["fast"] is not None
        and not has_recased_special(e["text"])
        and hf_ids(fast_reference, e["text"]) != e["fast"]
    ]
    assert not changed, f"installed fast tokenizer differs from the recorded one on {changed[:3]!r}"


ASCII_TEXT = st.text(alphabet=st.sampled_from("abcXYZ019 ,.'!?-_()\t\n:;\"&#@"), max_size=40)


@settings(max_examples=150, deadline=None)
@given(text=ASCII_TEXT)
def test_ascii_text_matches_fast_tokenizer(tokenizer, fast_reference, text):
    # No "<" or "|": on such text the slow and fast tokenizers are documented to agree.
    assert tokenizer(text) == hf_ids(fast_reference, text)


@settings(max_examples=200, deadline=None)
@given(text=st.text(st.characters(codec=None, exclude_categories=()), max_size=60))
def test_any_text_encodes_to_vocabulary_ids(tokenizer, text):
    ids = tokenizer(text)
    assert ids[0] == tokenizer.bos and ids[-1] == tokenizer.eos
    assert all(0 <= i < tokenizer.vocab_size for i in ids)


def test_decode_round_trip(tokenizer):
    text = "a photo of a cat, 1.5 times café 👍"
    assert tokenizer.decode(tokenizer.encode(text)) == "a photo of a cat , 1 . 5 times café 👍"
    assert tokenizer.decode(tokenizer("hi")) == "<|startoftext|>hi <|endoftext|>"
    with pytest.raises(PromptError):
        tokenizer.decode([49408])


def test_rejects_non_text_and_bad_vocab_file(tokenizer, tmp_path):
    with pytest.raises(PromptError):
        tokenizer.encode(b"bytes")  # type: ignore[arg-type]
    bad = tmp_path / "bad.txt.gz"
    bad.write_bytes(gzip.compress(b"header\nonly one line\n"))
    with pytest.raises(PromptError):
        ClipTokenizer(bad)
    with pytest.raises(PromptError):
        ClipTokenizer(tmp_path / "missing.gz")


def test_loads_and_encodes_quickly(tokenizer):
    # Loose bounds on a shared 2-core machine; typical numbers are ~10x smaller.
    start = time.perf_counter()
    ClipTokenizer()
    assert time.perf_counter() - start < 3.0
    fresh = ClipTokenizer()
    start = time.perf_counter()
    for text in build_corpus():
        fresh.encode(text)
    assert time.perf_counter() - start < 3.0


def regenerate_reference() -> None:
    """Record the slow tokenizer's ids (and the fast one's) for the corpus; needs transformers 4.x."""
    import tempfile

    import transformers

    cls = slow_clip_class()
    assert cls is not None, "run this with transformers 4.x, which still has the slow CLIPTokenizer"
    with tempfile.TemporaryDirectory() as tmp:
        files = write_hf_files(DEFAULT_VOCAB_PATH, Path(tmp))
        slow = cls.from_pretrained(str(files))
        assert slow.fix_text is None, "uninstall ftfy: ComfyUI runs without it"
        fast = transformers.CLIPTokenizerFast.from_pretrained(str(files))
        prompts = [{"text": t, "slow": hf_ids(slow, t), "fast": hf_ids(fast, t)} for t in build_corpus()]
    generated_by = (
        f"transformers {transformers.__version__} CLIPTokenizer (slow, no ftfy) and CLIPTokenizerFast, "
        f"from {DEFAULT_VOCAB_PATH.name} with comfy/sd1_tokenizer's config"
    )
    lines = ",\n".join(json.dumps(p) for p in prompts)  # one prompt per line: readable diffs
    REFERENCE_PATH.parent.mkdir(exist_ok=True)
    REFERENCE_PATH.write_text(
        f'{{"generated_by": {json.dumps(generated_by)},\n"prompts": [\n{lines}\n]}}\n', encoding="utf-8"
    )
    differing = sum(p["slow"] != p["fast"] for p in prompts)
    print(f"wrote {len(prompts)} prompts, slow and fast differ on {differing}")


if __name__ == "__main__" and "--regenerate" in sys.argv:
    regenerate_reference()
