"""Pure parts of the data path: TTS text normaliser, fast Whisper log-mel vs
WhisperFeatureExtractor, eSpeak NG and command-template TTS."""

import os
import sys

import numpy as np
import pytest
from transformers import WhisperFeatureExtractor

from trainer.data.features import LogMel
from datagen.normalize import normalize_for_tts, number_to_words, ordinal_to_words
from datagen.tts import CommandTTS, EspeakTTS

# Independent spellings, written out by hand.
CARDINALS = {0: "zero", 7: "seven", 13: "thirteen", 20: "twenty", 42: "forty-two", 100: "one hundred",
             105: "one hundred five", 999: "nine hundred ninety-nine", 1000: "one thousand",
             2024: "two thousand twenty-four", 1_000_001: "one million one",
             3_200_000_000: "three billion two hundred million", -8: "minus eight"}


@pytest.mark.parametrize("number,words", CARDINALS.items())
def test_number_to_words(number, words):
    assert number_to_words(number) == words


@pytest.mark.parametrize("number,words", [(1, "first"), (2, "second"), (3, "third"), (12, "twelfth"),
                                          (21, "twenty-first"), (40, "fortieth"), (100, "one hundredth")])
def test_ordinals(number, words):
    assert ordinal_to_words(number) == words


@pytest.mark.parametrize("text,spoken", [
    ("How many dogs? 3", "How many dogs? three"),
    ("It costs $5.", "It costs five dollars."),
    ("$1 or $2.50", "one dollar or two dollars and fifty cents"),
    ("£3 and €1", "three pounds and one euro"),
    ("$4 million", "four million dollars"),
    ("About 50% of 1,200 people", "About fifty percent of one thousand two hundred people"),
    ("pi is 3.14", "pi is three point one four"),
    ("the 1st and 22nd floor", "the first and twenty-second floor"),
    ("A) cat\nB) dog\n(C) bird", "option A, cat option B, dog option C, bird"),
    ("Choose:\nA. red\nB. blue", "Choose: option A, red option B, blue"),
    ("2 + 2 = 4", "two plus two equals four"),
    ("It is -5 degrees", "It is minus five degrees"),
    ("salt & pepper", "salt and pepper"),
    ("<image>\nWhat is shown?", "What is shown?"),
    ("a 3/4 view", "a three over four view"),
])
def test_normalize_for_tts(text, spoken):
    assert normalize_for_tts(text) == spoken


def test_normalize_leaves_no_digits_or_symbols():
    spoken = normalize_for_tts("In 2019, 75% of the 3 boxes cost $12.99 (item #4) & more + tax = 100")
    assert not any(ch.isdigit() for ch in spoken)
    assert not set("$%&#+=") & set(spoken)


@pytest.mark.parametrize("bins,chunk", [(80, 10), (128, 30)])
def test_log_mel_matches_whisper_feature_extractor(bins, chunk):
    extractor = WhisperFeatureExtractor(feature_size=bins, chunk_length=chunk)
    log_mel = LogMel(extractor)
    rng = np.random.default_rng(bins)
    window = extractor.n_samples
    for length in (1, 399, 16_000, 80_001, window - 250, window, window + 4000):
        # speech-like: a chirp with noise, plus a quiet stretch
        t = np.arange(length) / 16000
        audio = (0.3 * np.sin(2 * np.pi * (200 + 300 * t) * t) + 0.01 * rng.standard_normal(length)).astype(np.float32)
        audio[length // 2: length // 2 + 800] = 0.0
        reference = extractor(audio, sampling_rate=16000, return_tensors="np")["input_features"][0]
        ours = log_mel(audio).numpy()
        assert ours.shape == reference.shape == (bins, extractor.nb_max_frames)
        np.testing.assert_allclose(ours, reference, atol=1e-4, err_msg=f"clip of {length} samples")


def test_log_mel_of_silence_matches():
    extractor = WhisperFeatureExtractor(feature_size=80, chunk_length=10)
    silence = np.zeros(8000, np.float32)
    reference = extractor(silence, sampling_rate=16000, return_tensors="np")["input_features"][0]
    np.testing.assert_allclose(LogMel(extractor)(silence).numpy(), reference, atol=1e-4)


def test_espeak_tts_is_reproducible_and_varied():
    tts = EspeakTTS()
    first, rate = tts.synthesize("What colour is the circle?", seed=1)
    again, _ = tts.synthesize("What colour is the circle?", seed=1)
    assert rate > 8000 and first.dtype == np.float32 and first.ndim == 1
    assert 0.5 < len(first) / rate < 5.0
    assert 0.05 < np.abs(first).max() <= 1.0
    assert abs(len(first) - len(again)) < 0.01 * len(first), "same seed -> same voice, rate and pitch"
    lengths = [len(tts.synthesize("What colour is the circle?", seed=s)[0]) for s in range(6)]
    assert max(lengths) > 1.05 * min(lengths), "voice/rate/pitch should vary with the seed"


def test_espeak_speaks_numbers_as_words():
    tts = EspeakTTS(voices=["en-us"], rate_range=(175, 175), pitch_range=(50, 50))
    spoken_digit, _ = tts.synthesize("I have 3 cats", seed=0)
    spoken_word, _ = tts.synthesize("I have three cats", seed=0)
    spoken_many, _ = tts.synthesize("I have 300 cats", seed=0)
    assert abs(len(spoken_digit) - len(spoken_word)) < 0.01 * len(spoken_word)
    assert len(spoken_many) > len(spoken_digit) * 1.2


def test_espeak_unknown_voice_is_an_error():
    with pytest.raises(ValueError, match="no voice"):
        EspeakTTS(voices=["xx-nonexistent"]).synthesize("hello", seed=0)


ENGINE = """
import sys, numpy as np, soundfile as sf
text = sys.stdin.read()
out = sys.argv[sys.argv.index("--output_file") + 1]
sf.write(out, np.full(len(text) * 100, 0.25, np.float32), 22050)
"""


def test_command_tts_runs_template_without_shell(tmp_path):
    engine = tmp_path / "engine.py"
    engine.write_text(ENGINE)
    marker = tmp_path / "injected"
    tts = CommandTTS(f"{sys.executable} {engine} --output_file {{out}} < {{text_file}}")
    audio, rate = tts.synthesize(f"hi $(touch {marker}); touch {marker}", seed=0)
    assert rate == 22050 and audio.dtype == np.float32
    assert len(audio) == len(normalize_for_tts(f"hi $(touch {marker}); touch {marker}")) * 100
    assert not os.path.exists(marker)


def test_command_tts_reports_engine_failure(tmp_path):
    tts = CommandTTS(f"{sys.executable} -c 'import sys; sys.exit(3)' {{out}}")
    with pytest.raises(RuntimeError, match="failed"):
        tts.synthesize("hello", seed=0)
