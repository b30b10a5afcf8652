"""Scoring of generated answers: one pure function per task type (the report over many samples
is trainer/eval/report.py).

Every sample is asked twice, with the question typed ("text" mode, the VL score) and
spoken ("audio" mode, the VA score); both predictions go through the same scorer, so the
gap between the two is due to the question's modality only.

Rules (also in docs/evaluation.md):
  yesno   the prediction's first yes/no word decides ("Yes." == "yes", "Yes, there is" ->
          yes); a prediction with neither word scores 0. The reference must be yes or no.
  choice  the option letter ("B", "(B)", "B.", "B) blue") or the option text ("blue"),
          case- and punctuation-insensitive. The reference may be a letter or an option text.
  open    VQA-normalised exact match (lower case, no punctuation or articles, number words
          -> digits). With several references in "answers", VQA soft accuracy: for each
          leave-one-out subset, min(1, matches / bar), averaged over the subsets. bar = 3 for
          VQA's 10 answers; with fewer references bar = min(3, k - 1), so a short list of
          agreeing references still gives full credit.
  asr     1 - word error rate, clipped at 0.
Anything else is scored as "open".
"""

import re

MODES = ("text", "audio")

# The VQA evaluation's normalisation tables (number words, articles, contractions).
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10", "eleven": "11", "twelve": "12",
}
_ARTICLES = {"a", "an", "the"}
_CONTRACTIONS = {
    "arent": "aren't", "cant": "can't", "couldnt": "couldn't", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't", "havent": "haven't", "isnt": "isn't",
    "shouldnt": "shouldn't", "wasnt": "wasn't", "werent": "weren't", "wont": "won't",
    "wouldnt": "wouldn't", "youre": "you're", "theyre": "they're", "whats": "what's",
}
# A period between digits is a decimal point ("2.5"), any other period is punctuation.
_PERIOD_NOT_DECIMAL = re.compile(r"(?<!\d)\.|\.(?!\d)")
_COMMA_IN_NUMBER = re.compile(r"(\d),(\d)")
_NON_WORD = re.compile(r"[^\w\s]")
_PUNCTUATION = re.compile(r"[!\"#$%&()*+,\-/:;<=>?@\[\\\]^_`{|}~\u2018\u2019\u201c\u201d]")


def normalize_vqa(text: str) -> str:
    """VQA answer normalisation: lower case, punctuation removed, articles dropped,
    number words turned into digits, common contractions restored."""
    text = str(text).lower()
    text = _COMMA_IN_NUMBER.sub(r"\1\2", text)
    text = _PUNCTUATION.sub(" ", _PERIOD_NOT_DECIMAL.sub(" ", text))
    words = []
    for word in text.split():
        word = _NUMBER_WORDS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def _words(text: str) -> list[str]:
    """Lower-case words with punctuation removed (for yes/no, choices and WER);
    apostrophes join ("don't" -> "dont") rather than split."""
    text = re.sub(r"['\u2019]", "", str(text).lower())
    return _NON_WORD.sub(" ", text).split()


# --- yes/no -----------------------------------------------------------------------------
def parse_yes_no(text: str) -> str | None:
    """'yes' or 'no' from the first yes/no word of `text`, else None."""
    for word in _words(text):
        if word in ("yes", "no"):
            return word
    return None


def score_yes_no(prediction: str, reference: str) -> float:
    ref = parse_yes_no(reference)
    if ref is None or _words(reference) != [ref]:
        raise ValueError(f"yesno reference must be 'yes' or 'no', got {reference!r}")
    return float(parse_yes_no(prediction) == ref)


# --- multiple choice -------------------------------------------------------------------
_LETTER_LABEL = re.compile(r"^\s*\(?([A-Za-z])\s*[\).:\]]\s*(.*)$", re.S)
_BARE_LETTER = re.compile(r"^\s*\(?([A-Za-z])\)?\s*[.:]?\s*$")
_LETTER_THEN_TEXT = re.compile(r"^\s*([A-Za-z])\s+(.+)$", re.S)


def _option_text(choice: str) -> str:
    """An option's text without a leading label: 'B. blue' -> 'blue'."""
    m = _LETTER_LABEL.match(str(choice))
    return m.group(2) if m and m.group(2) else str(choice)


def parse_choice(prediction: str, choices: list[str]) -> int | None:
    """Index of the option `prediction` names, by letter or by text, else None."""
    texts = [" ".join(_words(_option_text(c))) for c in choices]
    pred_words = " ".join(_words(prediction))

    def letter_index(letter: str) -> int | None:
        i = ord(letter.upper()) - ord("A")
        return i if 0 <= i < len(choices) else None

    # The whole prediction is an option text ("blue"); checked first so that an option
    # text starting with "a " is not read as the letter A.
    if pred_words in texts:
        return texts.index(pred_words)
    m = _BARE_LETTER.match(prediction)
    if m:
        return letter_index(m.group(1))
    m = _LETTER_LABEL.match(prediction)
    if m:
        return letter_index(m.group(1))
    # "B blue": a letter then that same option's text; "C blue" contradicts itself.
    m = _LETTER_THEN_TEXT.match(prediction)
    if m:
        i = letter_index(m.group(1))
        rest = " ".join(_words(m.group(2)))
        if i is not None and rest == texts[i]:
            return i
        if i is not None and rest in texts:
            return None
    # A sentence that names exactly one option's text ("It is the square.").
    padded = f" {pred_words} "
    named = [i for i, t in enumerate(texts) if t and f" {t} " in padded]
    if len(named) == 1:
        return named[0]
    return None


def choice_reference_index(answer: str, choices: list[str]) -> int:
    """Index of the reference option, given as a letter ('B', '(B)') or as an option text."""
    texts = [" ".join(_words(_option_text(c))) for c in choices]
    m = _BARE_LETTER.match(str(answer))
    if m:
        i = ord(m.group(1).upper()) - ord("A")
        if 0 <= i < len(choices):
            return i
    ans = " ".join(_words(_option_text(answer)))
    if ans in texts:
        return texts.index(ans)
    raise ValueError(f"choice reference {answer!r} is neither an option letter nor one of the options {choices!r}")


def score_choice(prediction: str, reference: str, choices: list[str]) -> float:
    if not choices:
        raise ValueError(f"choice sample has no 'choices' (reference {reference!r})")
    return float(parse_choice(prediction, choices) == choice_reference_index(reference, choices))


# --- open-ended -------------------------------------------------------------------------
def vqa_soft_accuracy(prediction: str, references: list[str], normalize=None) -> float:
    """VQA accuracy, averaged over the leave-one-out subsets of the references; `normalize`
    (default normalize_vqa) is applied to the prediction and every reference."""
    normalize = normalize or normalize_vqa
    pred = normalize(prediction)
    refs = [normalize(r) for r in references]
    if len(refs) == 1:
        return float(pred == refs[0])
    bar = min(3, len(refs) - 1)
    total = 0.0
    for i in range(len(refs)):
        matches = sum(1 for j, r in enumerate(refs) if j != i and r == pred)
        total += min(1.0, matches / bar)
    return total / len(refs)


def score_open(prediction: str, reference: str, references: list[str] | None = None) -> float:
    if references:
        return vqa_soft_accuracy(prediction, list(references))
    return float(normalize_vqa(prediction) == normalize_vqa(reference))


# --- ASR --------------------------------------------------------------------------------
def word_edit_distance(hypothesis: list[str], reference: list[str]) -> int:
    """Levenshtein distance over words (substitutions, insertions, deletions cost 1)."""
    previous = list(range(len(reference) + 1))
    for i, h in enumerate(hypothesis, start=1):
        current = [i] + [0] * len(reference)
        for j, r in enumerate(reference, start=1):
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (h != r))
        previous = current
    return previous[-1]


def word_error_rate(prediction: str, reference: str) -> float:
    ref = _words(reference)
    hyp = _words(prediction)
    if not ref:
        return 0.0 if not hyp else float(len(hyp))
    return word_edit_distance(hyp, ref) / len(ref)


def score_asr(prediction: str, reference: str) -> float:
    return max(0.0, 1.0 - word_error_rate(prediction, reference))


def corpus_word_error_rate(pairs: list[tuple[str, str]]) -> float | None:
    """Corpus-level WER of (prediction, reference) pairs: all word edits over all reference
    words (not the mean of per-sample rates, which overweights short sentences); None when the
    references hold no words."""
    edits = words = 0
    for prediction, reference in pairs:
        ref = _words(reference)
        edits += word_edit_distance(_words(prediction), ref)
        words += len(ref)
    return edits / words if words else None


# --- the kind of an answer --------------------------------------------------------------
# Does a prediction answer in the form the question asks for, right or wrong? A spoken
# question answered with a position where a colour is asked is a failure to hear or follow it,
# not to see; the report counts the two apart (report.py: kind rates).
COLOUR_WORDS = frozenset({"red", "green", "blue", "yellow", "purple", "orange", "pink", "brown", "black", "white",
                          "grey", "gray", "violet", "cyan", "magenta", "gold", "silver"})
POSITION_WORDS = frozenset({"top", "bottom", "left", "right", "centre", "center", "middle", "upper", "lower"})
ANSWER_KINDS = ("yesno", "option", "number", "colour", "position", "other")


def answer_kind(text: str, choices: list[str] | None = None) -> str:
    """The form of a short answer, one of ANSWER_KINDS: "option" when `choices` are given and
    the text names one (by letter or text, as parse_choice reads it), "yesno" when its first
    word is yes or no, "number" for a count ("3", "three"), "colour" for one colour word,
    "position" for grid words only ("top left", "centre"), else "other" (empty included)."""
    if choices and parse_choice(text, choices) is not None:
        return "option"
    words = _words(text)
    if not words:
        return "other"
    if words[0] in ("yes", "no"):
        return "yesno"
    normalized = normalize_vqa(text)
    if normalized.isdigit():
        return "number"
    if normalized in COLOUR_WORDS:
        return "colour"
    if all(w in POSITION_WORDS for w in words):
        return "position"
    return "other"


# --- dispatch -----------------------------------------------------------------------
def score(prediction: str, sample_meta: dict) -> float:
    """Score in [0, 1] of one prediction. `sample_meta` holds "answer" and optionally
    "task" (yesno|choice|open|asr; anything else is open), "choices", "answers"."""
    task = sample_meta.get("task") or "open"
    reference = sample_meta.get("answer", "")
    try:
        if task == "yesno":
            return score_yes_no(prediction, reference)
        if task == "choice":
            return score_choice(prediction, reference, sample_meta.get("choices") or [])
        if task == "asr":
            return score_asr(prediction, reference)
        return score_open(prediction, reference, sample_meta.get("answers"))
    except ValueError as e:
        raise ValueError(f"sample {sample_meta.get('id', '?')!r}, field 'answer': {e}") from None


def parsed_answer(prediction: str, sample_meta: dict):
    """What the scorer read from the prediction (yes/no word, option letter), for the
    per-sample predictions file; None for free-form tasks."""
    task = sample_meta.get("task")
    if task == "yesno":
        return parse_yes_no(prediction)
    if task == "choice" and sample_meta.get("choices"):
        i = parse_choice(prediction, sample_meta["choices"])
        return None if i is None else chr(ord("A") + i)
    return None
