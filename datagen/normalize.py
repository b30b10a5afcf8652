"""Text normalisation before TTS: numbers, currency, percentages, ordinals, option
letters and common symbols become words, so every TTS engine speaks them the same way
("$5" -> "five dollars", "50%" -> "fifty percent", "A) cat" -> "option A, cat")."""

import re

_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
         "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_SCALES = [(10**12, "trillion"), (10**9, "billion"), (10**6, "million"), (1000, "thousand")]
_ORDINAL_WORDS = {"one": "first", "two": "second", "three": "third", "five": "fifth", "eight": "eighth",
                  "nine": "ninth", "twelve": "twelfth"}
_CURRENCIES = {"$": ("dollar", "dollars", "cent", "cents"), "£": ("pound", "pounds", "penny", "pence"),
               "€": ("euro", "euros", "cent", "cents")}
_SYMBOLS = {"&": " and ", "+": " plus ", "=": " equals ", "@": " at ", "#": " number ", "°": " degrees ",
            "×": " times ", "~": " about ", "*": " "}


def number_to_words(n: int) -> str:
    """Cardinal English words for an integer: 1234 -> 'one thousand two hundred thirty-four'."""
    if n < 0:
        return "minus " + number_to_words(-n)
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + ("-" + _ONES[ones] if ones else "")
    if n < 1000:
        hundreds, rest = divmod(n, 100)
        return _ONES[hundreds] + " hundred" + (" " + number_to_words(rest) if rest else "")
    for scale, name in _SCALES:
        if n >= scale:
            head, rest = divmod(n, scale)
            return number_to_words(head) + " " + name + (" " + number_to_words(rest) if rest else "")
    raise AssertionError("unreachable")


def ordinal_to_words(n: int) -> str:
    """21 -> 'twenty-first', 12 -> 'twelfth', 40 -> 'fortieth'."""
    words = number_to_words(n)
    head, sep, last = max(words.rpartition(" "), words.rpartition("-"), key=lambda p: len(p[0]))
    if last in _ORDINAL_WORDS:
        last = _ORDINAL_WORDS[last]
    elif last.endswith("y"):
        last = last[:-1] + "ieth"
    else:
        last += "th"
    return head + sep + last


def _decimal_to_words(text: str) -> str:
    """'3.25' -> 'three point two five'; '1,000' -> 'one thousand'."""
    whole, _, frac = text.replace(",", "").partition(".")
    words = number_to_words(int(whole)) if whole else "zero"
    if frac:
        words += " point " + " ".join(_ONES[int(d)] for d in frac)
    return words


def _currency(match: re.Match) -> str:
    one, many, sub_one, sub_many = _CURRENCIES[match.group(1)]
    whole, _, frac = match.group(2).replace(",", "").partition(".")
    amount = int(whole)
    words = f"{number_to_words(amount)} {one if amount == 1 else many}"
    if frac and int(frac[:2].ljust(2, "0")):
        cents = int(frac[:2].ljust(2, "0"))
        words += f" and {number_to_words(cents)} {sub_one if cents == 1 else sub_many}"
    scale = match.group(3)
    if scale:
        words = f"{number_to_words(amount)} {scale.lower()} {many}"
    return f" {words} "


_NUMBER = r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?"
_CURRENCY_RE = re.compile(r"([$£€])\s?(" + _NUMBER + r")(?:\s?(million|billion|thousand|trillion)\b)?", re.I)
_PERCENT_RE = re.compile(r"(" + _NUMBER + r")\s?%")
_ORDINAL_RE = re.compile(r"\b(\d+)(st|nd|rd|th)\b", re.I)
_NEGATIVE_RE = re.compile(r"(?<![\w.])-(" + _NUMBER + r")\b")
_NUMBER_RE = re.compile(r"(?<![\w.])(" + _NUMBER + r")(?![\d])")
_FRACTION_RE = re.compile(r"\b(\d+)/(\d+)\b")
# "A) cat", "(B) dog", "C. bird" at the start of a line or after whitespace.
_OPTION_RE = re.compile(r"(?m)(^|(?<=\s))\(?([A-H])\)(?=\s|$)|^([A-H])\.(?=\s)")


def _option(match: re.Match) -> str:
    letter = match.group(2) or match.group(3)
    return f"{match.group(1) or ''}option {letter},"


def normalize_for_tts(text: str) -> str:
    """Spoken form of a question: '<image>' tags dropped, numbers and symbols as words."""
    text = text.replace("<image>", " ")
    text = _OPTION_RE.sub(_option, text)
    text = _CURRENCY_RE.sub(_currency, text)
    text = _PERCENT_RE.sub(lambda m: f" {_decimal_to_words(m.group(1))} percent ", text)
    text = _ORDINAL_RE.sub(lambda m: ordinal_to_words(int(m.group(1))), text)
    text = _FRACTION_RE.sub(lambda m: f"{number_to_words(int(m.group(1)))} over {number_to_words(int(m.group(2)))}",
                            text)
    text = _NEGATIVE_RE.sub(lambda m: " minus " + _decimal_to_words(m.group(1)), text)
    text = _NUMBER_RE.sub(lambda m: _decimal_to_words(m.group(1)), text)
    text = text.replace("%", " percent ")
    for symbol, words in _SYMBOLS.items():
        text = text.replace(symbol, words)
    text = re.sub(r"\s+([,.?!;:])", r"\1", text)
    return re.sub(r"\s+", " ", text).strip()
