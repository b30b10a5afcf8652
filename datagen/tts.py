"""Text-to-speech for building spoken-question shards.

`EspeakTTS` drives libespeak-ng (shipped with its voice data by the PyPI package
`espeakng-loader`, so no root install is needed) through ctypes. `CommandTTS` runs any
external engine through a command template. Both return (float32 mono waveform, rate).

libespeak-ng keeps global state (one voice, one set of parameters, one callback), so all
calls in a process go through one lock; for parallel synthesis use processes
(`tools/make_shards.py --workers`), each process gets its own library instance.
"""

import ctypes
import os
import random
import shlex
import subprocess
import tempfile
import threading
import zlib

import numpy as np
import soundfile as sf

from datagen.normalize import normalize_for_tts

# Voices that ship with espeak-ng's data; "+f3"/"+m3" pick voice variants (timbre).
DEFAULT_VOICES = ["en-us", "en", "en-us+f3", "en+m3", "en-us+f2", "en-gb-x-rp", "en-029", "en-us-nyc", "en-gb-scotland+f4"]

# espeak_AUDIO_OUTPUT, espeak_PARAMETER and flag values from speak_lib.h.
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_ESPEAK_RATE = 1
_ESPEAK_PITCH = 3
_ESPEAK_CHARS_UTF8 = 1
_POS_CHARACTER = 1
_SYNTH_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)

_LIBRARY_LOCK = threading.Lock()
_LIBRARY = None  # (ctypes library, sample rate, callback keep-alive, chunk list)


def _espeak_library():
    """Load and initialise libespeak-ng once per process (call with _LIBRARY_LOCK held)."""
    global _LIBRARY
    if _LIBRARY is None:
        import espeakng_loader

        lib = ctypes.cdll.LoadLibrary(espeakng_loader.get_library_path())
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                     ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        data_path = espeakng_loader.get_data_path()
        sample_rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data_path.encode(), 0)
        if sample_rate <= 0:
            raise RuntimeError(f"espeak_Initialize failed (data path {data_path})")
        chunks: list[np.ndarray] = []

        def collect(wav, num_samples, _events):
            if num_samples > 0:
                chunks.append(np.ctypeslib.as_array(wav, shape=(num_samples,)).copy())
            return 0  # 0 = continue synthesis

        callback = _SYNTH_CALLBACK(collect)
        lib.espeak_SetSynthCallback(callback)
        _LIBRARY = (lib, sample_rate, callback, chunks)
    return _LIBRARY


def _sample_seed(text: str, seed: int) -> int:
    return zlib.crc32(f"{seed}\x00{text}".encode())


class EspeakTTS:
    """eSpeak NG speech with per-sample variety: voice, rate (words/min) and pitch (0-100)
    drawn from a RNG seeded by (seed, text), so a rebuild uses the same voice settings.
    eSpeak's waveform generator keeps state between utterances, so repeated synthesis of
    one clip differs in a few samples of length and noise; it is not bit-exact."""

    def __init__(self, voices: list[str] | None = None, rate_range=(140, 190), pitch_range=(35, 65),
                 normalize: bool = True):
        self.voices = list(voices) if voices else list(DEFAULT_VOICES)
        self.rate_range = rate_range
        self.pitch_range = pitch_range
        self.normalize = normalize

    def synthesize(self, text: str, seed: int = 0) -> tuple[np.ndarray, int]:
        rng = random.Random(_sample_seed(text, seed))
        voice = rng.choice(self.voices)
        rate = rng.randint(*self.rate_range)
        pitch = rng.randint(*self.pitch_range)
        spoken = normalize_for_tts(text) if self.normalize else text
        data = spoken.encode("utf-8")
        with _LIBRARY_LOCK:
            lib, sample_rate, _callback, chunks = _espeak_library()
            if lib.espeak_SetVoiceByName(voice.encode()) != 0:
                raise ValueError(f"eSpeak NG has no voice {voice!r}")
            lib.espeak_SetParameter(_ESPEAK_RATE, rate, 0)
            lib.espeak_SetParameter(_ESPEAK_PITCH, pitch, 0)
            chunks.clear()
            status = lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0, _ESPEAK_CHARS_UTF8, None, None)
            if status != 0:
                raise RuntimeError(f"espeak_Synth failed with status {status} for text {text!r}")
            lib.espeak_Synchronize()
            pcm = np.concatenate(chunks) if chunks else np.zeros(0, np.int16)
            chunks.clear()
        if pcm.size == 0:
            raise RuntimeError(f"eSpeak NG produced no audio for text {text!r}")
        return (pcm.astype(np.float32) / 32768.0), sample_rate


class CommandTTS:
    """Any external TTS engine through a command template, e.g.
    `piper --model en_US-lessac-medium.onnx --output_file {out} < {text_file}`.

    The template is split with shlex once, then `{out}` (wav path to write), `{text_file}`
    (UTF-8 text path) and `{text}` are substituted inside single arguments, so the text can
    never inject shell syntax. No shell runs: a `<` / `>` token redirects stdin / stdout to
    the file named by the next token.
    """

    def __init__(self, template: str, normalize: bool = True, timeout_s: float = 120.0):
        self.args = shlex.split(template)
        if not self.args:
            raise ValueError("empty --tts_cmd template")
        if not any("{out}" in a for a in self.args) and ">" not in self.args:
            raise ValueError(f"--tts_cmd template must write {{out}} (or redirect stdout with >): {template!r}")
        self.normalize = normalize
        self.timeout_s = timeout_s

    def synthesize(self, text: str, seed: int = 0) -> tuple[np.ndarray, int]:
        spoken = normalize_for_tts(text) if self.normalize else text
        with tempfile.TemporaryDirectory(prefix="tts_") as tmp:
            out_path = os.path.join(tmp, "out.wav")
            text_path = os.path.join(tmp, "text.txt")
            with open(text_path, "w", encoding="utf-8") as f:
                f.write(spoken)
            values = {"out": out_path, "text_file": text_path, "text": spoken, "seed": str(seed)}
            args, stdin_path, stdout_path = [], None, None
            tokens = iter(self.args)
            for token in tokens:
                if token in ("<", ">"):
                    target = next(tokens, None)
                    if target is None:
                        raise ValueError(f"--tts_cmd: {token!r} needs a file after it")
                    target = _substitute(target, values)
                    if token == "<":
                        stdin_path = target
                    else:
                        stdout_path = target
                else:
                    args.append(_substitute(token, values))
            stdin = open(stdin_path, "rb") if stdin_path else subprocess.DEVNULL
            stdout = open(stdout_path, "wb") if stdout_path else subprocess.DEVNULL
            try:
                proc = subprocess.run(args, stdin=stdin, stdout=stdout, stderr=subprocess.PIPE, timeout=self.timeout_s)
            finally:
                for handle in (stdin, stdout):
                    if hasattr(handle, "close"):
                        handle.close()
            if proc.returncode != 0:
                raise RuntimeError(f"TTS command {args[0]} failed ({proc.returncode}): "
                                   f"{proc.stderr.decode(errors='replace')[-500:]}")
            audio, sample_rate = sf.read(out_path, dtype="float32", always_2d=True)
        return audio.mean(axis=1), sample_rate


def _substitute(token: str, values: dict) -> str:
    for name, value in values.items():
        token = token.replace("{" + name + "}", value)
    return token
