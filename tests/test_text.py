import pytest

from training.text import (
    PAD,
    ZWNJ,
    Frontend,
    SymbolTable,
    en_cardinal,
    en_ordinal,
    fa_cardinal,
    normalize,
    unspeakable,
)

# ---------------------------------------------------------------- English


@pytest.mark.parametrize(
    "raw,expected",
    [
        ("Hello World", "hello world"),
        ("I have 3 cats and 21 dogs.", "i have three cats and twenty one dogs."),
        ("Dr. Smith met Mr. and Mrs. Jones.", "doctor smith met mister and misses jones."),
        ("It costs $5.50, not $1.", "it costs five dollars fifty cents, not one dollar."),
        ("The 1st and 22nd of May", "the first and twenty second of may"),
        (
            "In 1990 there were 1,234 of them",
            "in nineteen ninety there were one thousand two hundred thirty four of them",
        ),
        ("pi is 3.14", "pi is three point one four"),
        ("50% & more", "fifty percent and more"),
        ("Wait...   what?!", "wait. what?"),
        ("\u201cQuoted\u201d \u2014 she said", "quoted, she said"),
        ("It's a well-known caf\u00e9 (nearby)", "it's a well known cafe, nearby"),
        ("  ,Leading punctuation", "leading punctuation"),
        ("e.g. this, i.e. that, etc.", "for example this, that is that, et cetera"),
    ],
)
def test_normalize_en(raw, expected):
    assert normalize(raw, "en") == expected


def test_english_numbers():
    assert en_cardinal(0) == "zero"
    assert en_cardinal(105) == "one hundred five"
    assert en_cardinal(2_000_019) == "two million nineteen"
    assert en_ordinal(12) == "twelfth"
    assert en_ordinal(40) == "fortieth"
    assert en_ordinal(103) == "one hundred third"
    assert normalize("1905 and 2000 and 2024", "en") == (
        "nineteen oh five and two thousand and twenty twenty four"
    )


# ---------------------------------------------------------------- Persian


@pytest.mark.parametrize(
    "raw,expected",
    [
        # Arabic yeh and kaf become the Persian letters.
        ("علي كتاب را خواند", "علی کتاب را خواند"),
        ("\u0649", "ی"),
        # Persian and Arabic-Indic digits are read out.
        ("۱۲۳ کتاب", "صد و بیست و سه کتاب"),
        ("٤٥ قلم", "چهل و پنج قلم"),
        ("2500 تومان", "دو هزار و پانصد تومان"),
        ("۳٫۵", "سه ممیز پنج"),
        ("۲۰٪", "بیست درصد"),
        # Persian punctuation is kept; ASCII marks become the Persian ones.
        ("سلام، حال شما چطور است؟", "سلام، حال شما چطور است؟"),
        ("سلام, خوبی?", "سلام، خوبی؟"),
        ("اول؛ دوم", "اول؛ دوم"),
        # Tatweel goes; short-vowel marks and shadda go; tanwin (sounded) stays.
        ("کتـــاب", "کتاب"),
        ("عَلِیّ", "علی"),
        ("حتماً", "حتماً"),
        # Arabic presentation forms fold to letters.
        ("\ufeb3\ufefc\ufee1", "سلام"),
        # Whitespace and quotes.
        ("  «سلام»   دوست  ", "سلام دوست"),
    ],
)
def test_normalize_fa(raw, expected):
    assert normalize(raw, "fa") == expected


def test_zwnj_kept_inside_words_and_stripped_at_edges():
    assert normalize(f"می{ZWNJ}روم", "fa") == f"می{ZWNJ}روم"
    assert normalize(f"کتاب{ZWNJ}{ZWNJ}ها", "fa") == f"کتاب{ZWNJ}ها"
    assert normalize(f"{ZWNJ}می{ZWNJ}روم{ZWNJ} .", "fa") == f"می{ZWNJ}روم."
    assert normalize(f"خانه{ZWNJ} بزرگ", "fa") == "خانه بزرگ"
    assert normalize(f"خانه {ZWNJ}بزرگ{ZWNJ}", "fa") == "خانه بزرگ"
    assert normalize(f"سلام{ZWNJ}، دوست", "fa") == "سلام، دوست"


def test_persian_numbers():
    assert fa_cardinal(0) == "صفر"
    assert fa_cardinal(1000) == "هزار"
    assert fa_cardinal(1402) == "هزار و چهارصد و دو"
    assert fa_cardinal(2_000_000) == "دو میلیون"
    assert fa_cardinal(215) == "دویست و پانزده"


def test_unknown_language_is_refused():
    with pytest.raises(ValueError, match="unsupported language"):
        normalize("x", "de")
    with pytest.raises(ValueError, match="unsupported language"):
        Frontend("de")


# ---------------------------------------------------------------- what can be spoken


def test_unspeakable():
    assert unspeakable("Hello, world! 42", "en") == set()
    assert unspeakable("Hello \U0001f600 \u4f60", "en") == {"\U0001f600", "\u4f60"}
    assert unspeakable("سلام، دنیا ۴۲", "fa") == set()
    assert unspeakable("سلام hi", "fa") == {"h", "i"}
    assert unspeakable("hi سلام", "en") == {"س", "ل", "ا", "م"}


# ---------------------------------------------------------------- front-end


def test_chars_frontend():
    fe = Frontend("en", backend="chars")
    assert fe.backend == "chars"
    assert fe.tokens("Hi, 2!") == list("hi, two!")
    assert fe.tokens("a\U0001f600b") == ["a", "b"]  # unspeakable characters are dropped
    fa = Frontend("fa", backend="chars")
    assert fa.tokens(f"می{ZWNJ}روم") == ["م", "ی", ZWNJ, "ر", "و", "م"]


@pytest.fixture(scope="module")
def espeak_en():
    fe = Frontend("en", backend="auto")
    if fe.backend != "espeak":
        pytest.skip(f"espeak-ng not loadable here: {fe.fallback_reason}")
    return fe


def test_espeak_phonemes_english(espeak_en):
    tokens = espeak_en.tokens("Hello, world!")
    assert tokens[:3] == ["h", "ə", "l"]
    assert "," in tokens and tokens[-1] == "!"
    assert tokens.count(" ") == 1  # one word boundary
    # Stress marks are their own tokens, never glued to a vowel.
    assert "ˈ" in tokens and not any(len(t) > 1 and t[0] in "ˈˌ" for t in tokens)
    # Normalisation happens before phonemisation: numbers are spoken.
    assert espeak_en.tokens("2") == espeak_en.tokens("two")
    assert espeak_en.tokens("") == []


def test_espeak_phonemes_persian(espeak_en):
    fa = Frontend("fa")
    assert fa.backend == "espeak"
    tokens = fa.tokens("سلام، حال شما چطور است؟")
    assert tokens[:2] == ["s", "a"]
    assert "،" in tokens and tokens[-1] == "؟"
    # espeak names some Persian phonemes with a digit ("q1"); it stays one token.
    assert "q1" in fa.tokens("قطار") and not any(t.isdigit() for t in fa.tokens("قطار"))
    # Arabic and Persian spellings of a word give the same phonemes.
    assert fa.tokens("علي") == fa.tokens("علی")


def test_frontend_refuses_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        Frontend("en", backend="festival")


# ---------------------------------------------------------------- symbol table


def test_symbol_table_round_trip_and_pad():
    table = SymbolTable.from_tokens([["b", "a", " "], ["c", "a"]])
    assert table.to_list() == [PAD, " ", "a", "b", "c"]
    assert len(table) == 5
    assert table.encode(["a", "z", "c", PAD]) == [2, 4]  # unknown tokens and pad dropped
    assert table.decode([2, 0, 4]) == ["a", "c"]
    again = SymbolTable.from_list(table.to_list())
    assert again.to_list() == table.to_list()
    assert again.encode(["b"]) == table.encode(["b"])
    # A checkpoint's list without the pad still gets id 0 reserved.
    assert SymbolTable(["x", "y"]).encode(["x", "y"]) == [1, 2]
    with pytest.raises(ValueError, match="duplicate"):
        SymbolTable([PAD, "a", "a"])
