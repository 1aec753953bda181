"""Text front-end: per-language normalisation, phonemes (espeak-ng) or characters, symbol table.

The symbol table is built from the corpus and saved in every checkpoint as a plain list, so a
checkpoint keeps speaking the same way even after this module learns new symbols.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import unicodedata
from collections.abc import Iterable

PAD = "<pad>"
WORD = " "
LANGS = ("en", "fa")

# ---------------------------------------------------------------- English

_EN_ONES = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
]
_EN_TENS = ["_", "_", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_EN_SCALES = ((10**9, "billion"), (10**6, "million"), (1000, "thousand"))
_EN_ORDINAL_WORDS = {
    "one": "first",
    "two": "second",
    "three": "third",
    "five": "fifth",
    "eight": "eighth",
    "nine": "ninth",
    "twelve": "twelfth",
}


def _en_below_1000(n: int) -> str:
    words = []
    if n >= 100:
        words += [_EN_ONES[n // 100], "hundred"]
        n %= 100
    if n >= 20:
        words.append(_EN_TENS[n // 10] + (f" {_EN_ONES[n % 10]}" if n % 10 else ""))
    elif n or not words:
        words.append(_EN_ONES[n])
    return " ".join(words)


def en_cardinal(n: int) -> str:
    if n < 0:
        return "minus " + en_cardinal(-n)
    if n >= 10**12:
        return " ".join(_EN_ONES[int(d)] for d in str(n))
    words = []
    for scale, name in _EN_SCALES:
        if n >= scale:
            words.append(f"{en_cardinal(n // scale)} {name}")
            n %= scale
    if n or not words:
        words.append(_en_below_1000(n))
    return " ".join(words)


def en_ordinal(n: int) -> str:
    words = en_cardinal(n).split(" ")
    last = words[-1]
    if last in _EN_ORDINAL_WORDS:
        words[-1] = _EN_ORDINAL_WORDS[last]
    elif last.endswith("y"):
        words[-1] = last[:-1] + "ieth"
    else:
        words[-1] = last + "th"
    return " ".join(words)


def _en_year(n: int) -> str:
    """1990 -> nineteen ninety, 1905 -> nineteen oh five, 1900 -> nineteen hundred."""
    high, low = divmod(n, 100)
    if low == 0:
        return f"{en_cardinal(high)} hundred"
    if low < 10:
        return f"{en_cardinal(high)} oh {en_cardinal(low)}"
    return f"{en_cardinal(high)} {en_cardinal(low)}"


def _en_number(text: str) -> str:
    digits = text.replace(",", "")
    n = int(digits)
    if "," not in text and len(digits) == 4 and (1100 <= n <= 1999 or 2010 <= n <= 2099):
        return _en_year(n)
    return en_cardinal(n)


_EN_ABBREVIATIONS = [
    (re.compile(rf"\b{abbr}\.", re.IGNORECASE), expansion)
    for abbr, expansion in [
        ("mrs", "misses"),
        ("mr", "mister"),
        ("ms", "miss"),
        ("dr", "doctor"),
        ("st", "saint"),
        ("jr", "junior"),
        ("sr", "senior"),
        ("prof", "professor"),
        ("capt", "captain"),
        ("gen", "general"),
        ("lt", "lieutenant"),
        ("col", "colonel"),
        ("sgt", "sergeant"),
        ("rev", "reverend"),
        ("hon", "honorable"),
        ("co", "company"),
        ("ltd", "limited"),
        ("inc", "incorporated"),
        ("vs", "versus"),
        ("etc", "et cetera"),
        ("approx", "approximately"),
        ("no(?=\\s*\\d)", "number"),
        ("ft", "feet"),
        ("mt", "mount"),
    ]
] + [
    (re.compile(r"\be\.g\.", re.IGNORECASE), "for example"),
    (re.compile(r"\bi\.e\.", re.IGNORECASE), "that is"),
]

_EN_SYMBOLS = {"&": " and ", "%": " percent", "+": " plus ", "@": " at ", "=": " equals "}
_CURRENCIES = {"$": ("dollar", "dollars", "cent", "cents"), "£": ("pound", "pounds", "penny", "pence"),
               "€": ("euro", "euros", "cent", "cents")}  # fmt: skip

_NUMBER = r"\d{1,3}(?:,\d{3})+|\d+"
_RE_CURRENCY = re.compile(rf"([$£€])\s?({_NUMBER})(?:\.(\d{{1,2}}))?\b")
_RE_ORDINAL = re.compile(r"\b(\d+)(st|nd|rd|th)\b", re.IGNORECASE)
_RE_DECIMAL = re.compile(rf"({_NUMBER})\.(\d+)")
_RE_INTEGER = re.compile(_NUMBER)


def _en_currency(m: re.Match) -> str:
    one, many, sub_one, sub_many = _CURRENCIES[m.group(1)]
    whole = int(m.group(2).replace(",", ""))
    out = f"{en_cardinal(whole)} {one if whole == 1 else many}"
    if m.group(3):
        cents = int(m.group(3).ljust(2, "0"))
        if cents:
            out += f" {en_cardinal(cents)} {sub_one if cents == 1 else sub_many}"
    return out


# Punctuation kept as prosody cues; everything else maps onto these or goes.
EN_PUNCT = ".,?!;:"
_EN_PUNCT_MAP = str.maketrans(
    {
        "\u2018": "'",
        "\u2019": "'",
        "`": "'",
        "\u201c": " ",
        "\u201d": " ",
        '"': " ",
        "\u2014": ", ",
        "\u2013": ", ",
        "\u2026": ".",
        "(": ", ",
        ")": ", ",
        "[": ", ",
        "]": ", ",
        "{": ", ",
        "}": ", ",
        "\u00ab": " ",
        "\u00bb": " ",
        "/": " ",
        "_": " ",
        "*": " ",
    }
)


def _strip_accents(text: str) -> str:
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c))


def _tidy_punctuation(text: str, punct: str) -> str:
    p = re.escape(punct)
    text = re.sub(r"\s+", " ", text)
    text = re.sub(rf"\s+([{p}])", r"\1", text)  # no space before punctuation
    text = re.sub(rf"([{p}])(?:[\s{p}]*[{p}])+", r"\1", text)  # ",," / "?!" / ", ." -> first
    text = re.sub(rf"^[\s{p}]+", "", text)  # no leading punctuation
    text = re.sub(rf"([{p}])(?=[^\s{p}])", r"\1 ", text)  # a space after punctuation
    return re.sub(r"[\s,;:\u060c\u061b]+$", "", text)  # a pause mark cannot end a sentence


def normalize_en(text: str) -> str:
    text = _strip_accents(text).translate(_EN_PUNCT_MAP)
    for pattern, expansion in _EN_ABBREVIATIONS:
        text = pattern.sub(expansion, text)
    text = _RE_CURRENCY.sub(_en_currency, text)
    for symbol, word in _EN_SYMBOLS.items():
        text = text.replace(symbol, word)
    text = _RE_ORDINAL.sub(lambda m: en_ordinal(int(m.group(1))), text)
    text = _RE_DECIMAL.sub(
        lambda m: (
            f"{_en_number(m.group(1))} point {' '.join(_EN_ONES[int(d)] for d in m.group(2))}"
        ),
        text,
    )
    text = _RE_INTEGER.sub(lambda m: f" {_en_number(m.group(0))} ", text)
    text = text.lower()
    # Hyphenated words are read as separate words; a lone dash is a pause.
    text = re.sub(r"(?<=\w)-(?=\w)", " ", text)
    text = re.sub(r"\s-+\s|-{2,}", ", ", text).replace("-", " ")
    text = re.sub(r"(?<![a-z])'|'(?![a-z])", " ", text)  # quotes, not apostrophes
    return _tidy_punctuation(text, EN_PUNCT)


# ---------------------------------------------------------------- Persian

ZWNJ = "\u200c"
TATWEEL = "\u0640"
FATHATAN = "\u064b"
# Short vowels, shadda, sukun and Quranic marks: rarely written in Persian, so a corpus that
# writes them on some words would otherwise give two spellings of one word.
_FA_DIACRITICS = re.compile("[\u064c-\u0652\u0653-\u065f\u0670\u06d6-\u06ed]")
_FA_LETTER_MAP = str.maketrans(
    {
        "\u064a": "\u06cc",  # Arabic yeh -> Persian yeh
        "\u0649": "\u06cc",  # alef maksura -> Persian yeh
        "\u0643": "\u06a9",  # Arabic kaf -> keheh
        "\u06c0": "\u0647\u0654",  # heh with yeh above, one spelling
        "\u0660": "0", "\u0661": "1", "\u0662": "2", "\u0663": "3", "\u0664": "4",
        "\u0665": "5", "\u0666": "6", "\u0667": "7", "\u0668": "8", "\u0669": "9",
        "\u06f0": "0", "\u06f1": "1", "\u06f2": "2", "\u06f3": "3", "\u06f4": "4",
        "\u06f5": "5", "\u06f6": "6", "\u06f7": "7", "\u06f8": "8", "\u06f9": "9",
        "\u066b": ".",  # Arabic decimal separator
        "\u066c": ",",  # Arabic thousands separator
        "\u066a": "%",
        ",": "\u060c",
        "?": "\u061f",
        ";": "\u061b",
        "\u00ab": " ", "\u00bb": " ", '"': " ", "\u201c": " ", "\u201d": " ",
        "(": "\u060c ", ")": "\u060c ", "[": "\u060c ", "]": "\u060c ",
        "\u2026": ".", "\u2014": "\u060c ", "\u2013": "\u060c ",
        TATWEEL: "",
        "\u200d": "",  # ZWJ: never wanted in running Persian text
        "\u200f": "", "\u200e": "", "\ufeff": "",  # direction marks, BOM
    }
)  # fmt: skip

_FA_ONES = [
    "صفر",
    "یک",
    "دو",
    "سه",
    "چهار",
    "پنج",
    "شش",
    "هفت",
    "هشت",
    "نه",
    "ده",
    "یازده",
    "دوازده",
    "سیزده",
    "چهارده",
    "پانزده",
    "شانزده",
    "هفده",
    "هجده",
    "نوزده",
]
_FA_TENS = ["_", "_", "بیست", "سی", "چهل", "پنجاه", "شصت", "هفتاد", "هشتاد", "نود"]
_FA_HUNDREDS = ["_", "صد", "دویست", "سیصد", "چهارصد", "پانصد", "ششصد", "هفتصد", "هشتصد", "نهصد"]
_FA_SCALES = ((10**9, "میلیارد"), (10**6, "میلیون"), (1000, "هزار"))


def _fa_below_1000(n: int) -> list[str]:
    parts = []
    if n >= 100:
        parts.append(_FA_HUNDREDS[n // 100])
        n %= 100
    if n >= 20:
        parts.append(_FA_TENS[n // 10])
        n %= 10
    if n:
        parts.append(_FA_ONES[n])
    return parts


def fa_cardinal(n: int) -> str:
    if n < 0:
        return "منفی " + fa_cardinal(-n)
    if n == 0:
        return _FA_ONES[0]
    if n >= 10**12:
        return " ".join(_FA_ONES[int(d)] for d in str(n))
    parts = []
    for scale, name in _FA_SCALES:
        if n >= scale:
            count = n // scale
            parts.append(name if (scale == 1000 and count == 1) else f"{fa_cardinal(count)} {name}")
            n %= scale
    parts += _fa_below_1000(n)
    return " و ".join(parts)


def _fa_number(m: re.Match) -> str:
    whole = fa_cardinal(int(m.group(1).replace(",", "")))
    if m.group(2):
        whole += " ممیز " + fa_cardinal(int(m.group(2)))
    return f" {whole} "


_RE_FA_NUMBER = re.compile(rf"({_NUMBER})(?:\.(\d+))?")
FA_PUNCT = ".\u060c\u061f\u061b!:"


def normalize_fa(text: str) -> str:
    # NFKC folds Arabic presentation forms (isolated/final glyph code points) to letters.
    text = unicodedata.normalize("NFKC", text).translate(_FA_LETTER_MAP)
    text = _FA_DIACRITICS.sub("", text)
    text = text.replace("%", " درصد ")
    text = _RE_FA_NUMBER.sub(_fa_number, text)
    text = _tidy_punctuation(re.sub(f"{ZWNJ}+", ZWNJ, text), FA_PUNCT)
    # ZWNJ only joins parts of one word (می‌روم, کتاب‌ها): drop it next to spaces,
    # punctuation and the ends of the text.
    edge = rf"[\s{re.escape(FA_PUNCT)}]"
    text = re.sub(rf"{ZWNJ}(?={edge}|$)|(?:(?<={edge})|^){ZWNJ}", "", text)
    return re.sub(r"\s+", " ", text).strip()


def normalize(text: str, lang: str) -> str:
    if lang == "en":
        return normalize_en(text)
    if lang == "fa":
        return normalize_fa(text)
    raise ValueError(f"unsupported language {lang!r}; supported: {', '.join(LANGS)}")


# ---------------------------------------------------------------- what can be spoken

_EN_ALPHABET = set("abcdefghijklmnopqrstuvwxyz'") | set(EN_PUNCT) | {" "}
_FA_LETTERS = "ءآأؤإئابتثجحخدذرزسشصضطظعغفقلمنهوپچژکگیةۀ\u0654" + FATHATAN
_FA_ALPHABET = set(_FA_LETTERS) | set(FA_PUNCT) | {" ", ZWNJ}
ALPHABETS = {"en": _EN_ALPHABET, "fa": _FA_ALPHABET}


def unspeakable(text: str, lang: str) -> set[str]:
    """Characters left after normalisation that the front-end has no sound for (emoji, other
    scripts, stray symbols); the corpus check reports them per utterance."""
    alphabet = ALPHABETS[lang]
    return {c for c in normalize(text, lang) if c not in alphabet}


# ---------------------------------------------------------------- front-end

_ESPEAK_VOICES = {"en": "en-us", "fa": "fa"}
_STRESS = "ˈˌ"
_backends: dict[tuple[int, str], object] = {}
_backends_lock = threading.Lock()


def _espeak_backend(lang: str):
    """One phonemizer backend per process and language; rebuilt after a fork, because the
    espeak-ng library keeps C state that a child process must not share."""
    key = (os.getpid(), lang)
    with _backends_lock:
        if key not in _backends:
            import espeakng_loader
            from phonemizer.backend import EspeakBackend
            from phonemizer.backend.espeak.wrapper import EspeakWrapper
            from phonemizer.punctuation import Punctuation

            EspeakWrapper.set_library(espeakng_loader.get_library_path())
            EspeakWrapper.set_data_path(espeakng_loader.get_data_path())
            quiet = logging.getLogger("training.text.phonemizer")
            quiet.setLevel(logging.ERROR)
            _backends[key] = EspeakBackend(
                _ESPEAK_VOICES[lang],
                punctuation_marks=Punctuation.default_marks() + FA_PUNCT,
                preserve_punctuation=True,
                with_stress=True,
                language_switch="remove-flags",
                logger=quiet,
            )
        return _backends[key]


class Frontend:
    """normalise -> tokens. `backend` says what is actually used: "espeak" or "chars"
    (with "auto", chars when the espeak-ng library cannot be loaded here)."""

    def __init__(self, lang: str = "en", backend: str = "auto"):
        if lang not in LANGS:
            raise ValueError(f"unsupported language {lang!r}; supported: {', '.join(LANGS)}")
        if backend not in ("auto", "espeak", "chars"):
            raise ValueError(f"backend must be auto, espeak or chars, not {backend!r}")
        self.lang = lang
        self.fallback_reason: str | None = None
        if backend == "chars":
            self.backend = "chars"
            return
        try:
            _espeak_backend(lang)
            self.backend = "espeak"
        except Exception as exc:  # any failure to load the C library means: no phonemes here
            if backend == "espeak":
                raise RuntimeError(f"espeak-ng is not usable: {exc}") from exc
            self.backend = "chars"
            self.fallback_reason = f"espeak-ng could not be loaded ({exc}); using characters"

    def tokens(self, text: str) -> list[str]:
        norm = normalize(text, self.lang)
        if self.backend == "chars":
            alphabet = ALPHABETS[self.lang]
            return [c for c in norm if c in alphabet]
        return self._phonemes(norm)

    def _phonemes(self, norm: str) -> list[str]:
        from phonemizer.separator import Separator

        if not norm.strip():
            return []
        sep = Separator(phone=" ", word=" | ", syllable="")
        out = _espeak_backend(self.lang).phonemize([norm], separator=sep, strip=True)
        punct = set(EN_PUNCT + FA_PUNCT)
        tokens: list[str] = []
        for word in out[0].split("|") if out else []:
            for phone in word.split():
                # Punctuation comes glued to the phone next to it ("d," or "(ok"); stress marks
                # come glued to the vowel. Both become tokens of their own so the table stays
                # small: one vowel symbol, not one per stress level.
                head = ""
                while phone and phone[0] in punct:
                    head, phone = head + phone[0], phone[1:]
                tail = ""
                while phone and phone[-1] in punct:
                    phone, tail = phone[:-1], phone[-1] + tail
                tokens += list(head)
                while phone and phone[0] in _STRESS:
                    tokens.append(phone[0])
                    phone = phone[1:]
                if phone.isdigit() and tokens and tokens[-1] not in punct | {WORD}:
                    # espeak's Persian voice names some phonemes like "q1" and the separator
                    # splits them; digits never stand alone (normalisation spells numbers out).
                    tokens[-1] += phone
                elif phone:
                    tokens.append(phone)
                tokens += list(tail)
            tokens.append(WORD)
        while tokens and tokens[-1] == WORD:
            tokens.pop()
        return tokens


class SymbolTable:
    """Token <-> id. Id 0 is padding; stored in checkpoints as `to_list()`."""

    def __init__(self, symbols: Iterable[str]):
        symbols = list(symbols)
        if not symbols or symbols[0] != PAD:
            symbols = [PAD] + [s for s in symbols if s != PAD]
        if len(set(symbols)) != len(symbols):
            raise ValueError("symbol table has duplicate symbols")
        self.symbols = symbols
        self.ids = {s: i for i, s in enumerate(symbols)}

    @classmethod
    def from_tokens(cls, token_lists: Iterable[Iterable[str]]) -> SymbolTable:
        """Sorted, so the same corpus always gives the same ids."""
        return cls(sorted({t for tokens in token_lists for t in tokens} - {PAD}))

    @classmethod
    def from_list(cls, symbols: list[str]) -> SymbolTable:
        return cls(symbols)

    def to_list(self) -> list[str]:
        return list(self.symbols)

    def encode(self, tokens: Iterable[str]) -> list[int]:
        return [self.ids[t] for t in tokens if t in self.ids and t != PAD]

    def decode(self, ids: Iterable[int]) -> list[str]:
        return [self.symbols[i] for i in ids if 0 < i < len(self.symbols)]

    def __len__(self) -> int:
        return len(self.symbols)

    def __contains__(self, token: str) -> bool:
        return token in self.ids


def words(text: str) -> list[str]:
    """Lower-case English words with punctuation dropped and numbers spelled out: what word
    error rates compare, for the scores and the dataset quality gate alike."""
    return re.findall(r"[a-z]+(?:'[a-z]+)?", normalize(text, "en").lower())


def word_error_rate(reference: str, hypothesis: str) -> float:
    """(substitutions + deletions + insertions) / reference words, by edit distance over words."""
    ref, hyp = words(reference), words(hypothesis)
    if not ref:
        raise ValueError("the reference text has no words")
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1] / len(ref)
