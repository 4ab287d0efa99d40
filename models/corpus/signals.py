"""Realistic offline input sources shared by the audio and text families: speech, noise, sentences, wheel helpers.

Speech comes from eSpeak NG (the ``espeakng-loader`` wheel bundles libespeak-ng and its voice data; it is driven
through ctypes, so nothing but the wheel is needed). Synthesis is deterministic for a given text, voice and rate, so
the inputs only depend on the seeded generator. Sentences come from the docstrings of Python's standard library.
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import importlib.util
import inspect
import re
from pathlib import Path
from types import ModuleType

import numpy as np

RATE = 16000  # every audio model of the corpus runs at 16 kHz

# Docstrings of these modules give plain English sentences of all lengths; a fixed list keeps the pool stable.
_DOC_MODULE_LIST = (
    "argparse asyncio base64 bisect calendar collections configparser contextlib csv datetime decimal difflib email "
    "fractions functools gzip heapq html http.client inspect ipaddress itertools json logging math os pathlib pickle "
    "random re shutil socket sqlite3 statistics string subprocess tarfile tempfile textwrap threading time typing "
    "unittest urllib.parse uuid zipfile"
)
_DOC_MODULES = tuple(_DOC_MODULE_LIST.split())
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_CODE_LIKE = re.compile(r"[<>{}\[\]|=_\\`]|\(\)|\.\.\.")
# eSpeak voice variants (speaker timbres) mixed with the English accents below give different "speakers". Not the
# breathy ones (f2, f3): their breath noise comes from libc's rand() and differs from run to run.
_VARIANTS = ("", "+f1", "+f4", "+m1", "+m2", "+m3", "+m4", "+m7", "+klatt", "+croak")
_ACCENTS = ("en-us", "en", "en-gb-x-rp", "en-gb-scotland", "en-029")


@functools.lru_cache(maxsize=1)
def docstring_sentences() -> tuple[str, ...]:
    """English sentences (20-200 printable ASCII characters) from stdlib docstrings, in a fixed order."""
    seen: set[str] = set()
    out: list[str] = []
    for name in _DOC_MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:  # a stripped-down Python may lack one; the pool just gets smaller
            continue
        objs = [mod] + [getattr(mod, a) for a in sorted(dir(mod)) if not a.startswith("_")]
        for obj in objs:
            doc = inspect.getdoc(obj) if callable(obj) or isinstance(obj, ModuleType) else None
            if not doc:
                continue
            para = " ".join(doc.split("\n\n")[0].split())
            for s in _SENTENCE_END.split(para):
                plain = s.isascii() and s.isprintable() and not _CODE_LIKE.search(s)
                if 20 <= len(s) <= 200 and plain and s[0].isupper() and s not in seen:
                    seen.add(s)
                    out.append(s)
    return tuple(out)


def pick_sentences(rng: np.random.Generator, n: int) -> list[str]:
    pool = docstring_sentences()
    return [pool[int(i)] for i in rng.integers(0, len(pool), size=n)]


class _Espeak:
    """libespeak-ng from the espeakng-loader wheel in synchronous mode, samples gathered by a callback.

    libespeak-ng keeps synthesis state in static variables (the same text comes out a few samples different on each
    call, even after espeak_Terminate), so every utterance loads the library afresh and unloads it afterwards: that
    makes each utterance a pure function of its text and voice settings (about 10 ms each).
    """

    _CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)

    def __init__(self) -> None:
        try:
            import espeakng_loader
        except ImportError as e:  # pragma: no cover - environment
            raise ImportError("speech inputs need the espeakng-loader wheel: pip install espeakng-loader") from e
        self.lib_path = espeakng_loader.get_library_path()
        self.data_path = espeakng_loader.get_data_path().encode()
        self.rate = 22050  # espeak_Initialize returns it; checked on every load
        self._chunks: list[np.ndarray] = []
        self._cb = self._CALLBACK(self._collect)  # one object for all loads: libespeak keeps the pointer

    def _collect(self, wav: ctypes._Pointer, n: int, _events: int) -> int:
        if n > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        return 0

    def say(self, text: str, voice: str, rate: int, pitch: int, pitch_range: int) -> np.ndarray:
        import _ctypes

        lib = ctypes.CDLL(self.lib_path)
        try:
            # AUDIO_OUTPUT_SYNCHRONOUS = 2: espeak_Synth returns when the text is spoken
            if int(lib.espeak_Initialize(2, 0, self.data_path, 0)) != self.rate:
                raise RuntimeError("espeak_Initialize failed")
            lib.espeak_SetSynthCallback(self._cb)
            if lib.espeak_SetVoiceByName(voice.encode()) != 0:
                lib.espeak_SetVoiceByName(b"en-us")
            for param, value in ((1, rate), (3, pitch), (4, pitch_range)):  # espeakRATE, espeakPITCH, espeakRANGE
                lib.espeak_SetParameter(param, value, 0)
            self._chunks.clear()
            data = text.encode()
            lib.espeak_Synth(data, len(data) + 1, 0, 1, 0, 0, None, None)  # POS_CHARACTER, espeakCHARS_AUTO
            lib.espeak_Terminate()
        finally:
            _ctypes.dlclose(lib._handle)
        if not self._chunks:
            return np.zeros(0, np.float32)
        return np.concatenate(self._chunks).astype(np.float32) / 32768.0


@functools.lru_cache(maxsize=1)
def _espeak() -> _Espeak:
    return _Espeak()


def resample(x: np.ndarray, src: int, dst: int) -> np.ndarray:
    """Band-limited resampling by zero-padding/truncating the spectrum (whole signal, float32)."""
    if src == dst or len(x) == 0:
        return x.astype(np.float32)
    g = np.gcd(src, dst)
    a, b = src // g, dst // g
    # pad to a*2^k samples so both FFT lengths (a*2^k and b*2^k) are fast, then cut the padding back off
    k = 1 << int(np.ceil(np.log2(max(len(x) / a, 1))))
    n_in, n_out = a * k, b * k
    spec = np.fft.rfft(x.astype(np.float64), n_in)
    out = np.zeros(n_out // 2 + 1, np.complex128)
    m = min(len(out), len(spec))
    out[:m] = spec[:m]
    y = np.fft.irfft(out, n_out) * (n_out / n_in)
    return y[: round(len(x) * dst / src)].astype(np.float32)


Speaker = tuple[str, int, int, int]  # eSpeak voice name, words per minute, pitch, pitch range


def random_speaker(rng: np.random.Generator) -> Speaker:
    voice = str(rng.choice(_ACCENTS)) + str(rng.choice(_VARIANTS))
    return voice, int(rng.integers(130, 210)), int(rng.integers(25, 75)), int(rng.integers(20, 80))


def speech(rng: np.random.Generator, text: str | None = None, speaker: Speaker | None = None) -> np.ndarray:
    """One utterance at 16 kHz from ``speaker`` (default: a random one), peak about 0.3-0.9."""
    text = text if text is not None else pick_sentences(rng, 1)[0]
    speaker = speaker or random_speaker(rng)
    tts = _espeak()
    x = resample(tts.say(text, *speaker), tts.rate, RATE)
    peak = float(np.max(np.abs(x))) if len(x) else 0.0
    return x * (rng.uniform(0.3, 0.9) / peak) if peak > 0 else x


def noise(rng: np.random.Generator, n: int, kind: str | None = None) -> np.ndarray:
    """Unit-RMS background noise: white, pink, brown, mains hum, fan (low-passed), or babble of other speech."""
    kinds = ("white", "pink", "brown", "hum", "fan", "babble")
    kind = kind or str(rng.choice(kinds))
    if kind == "babble":
        x = np.zeros(n, np.float32)
        for _ in range(3):
            s = speech(rng)
            s = np.tile(s, int(np.ceil(n / max(len(s), 1))))[:n] if len(s) else np.zeros(n, np.float32)
            x += np.roll(s, int(rng.integers(0, n)))
    elif kind == "hum":
        t = np.arange(n) / RATE
        f0 = float(rng.choice((50.0, 60.0)))
        x = sum(rng.uniform(0.2, 1.0) / k * np.sin(2 * np.pi * f0 * k * t + rng.uniform(0, 6.3)) for k in range(1, 8))
        x = np.asarray(x) + 0.05 * rng.standard_normal(n)
    else:
        m = 1 << int(np.ceil(np.log2(max(n, 2))))  # shape the spectrum at a power-of-two length: fast FFTs
        spec = np.fft.rfft(rng.standard_normal(m))
        f = np.maximum(np.fft.rfftfreq(m, 1 / RATE), 20.0)
        shape = {"white": np.ones_like(f), "pink": f**-0.5, "brown": f**-1.0, "fan": 1 / (1 + (f / 400.0) ** 2)}[kind]
        x = np.fft.irfft(spec * shape, m)[:n]
    x = np.asarray(x, np.float64)
    return (x / (np.sqrt(np.mean(x**2)) + 1e-12)).astype(np.float32)


def mix(clean: np.ndarray, background: np.ndarray, snr_db: float) -> np.ndarray:
    """``clean`` plus ``background`` scaled to ``snr_db`` (against the clean signal's active RMS)."""
    active = clean[np.abs(clean) > 0.02 * (np.max(np.abs(clean)) + 1e-12)]
    rms = float(np.sqrt(np.mean(active**2))) if len(active) else 1e-3
    return (clean + background[: len(clean)] * rms * 10 ** (-snr_db / 20)).astype(np.float32)


def noisy_speech(
    rng: np.random.Generator, seconds: float | None = None, snr: tuple[float, float] = (0.0, 25.0), lead: float = 0.3
) -> np.ndarray:
    """An utterance with up to ``lead`` s of silence around it, in noise at a random SNR (``seconds``: fixed length)."""
    s = speech(rng)
    pre, post = (int(rng.uniform(0.05, lead) * RATE) for _ in range(2))
    s = np.concatenate([np.zeros(pre, np.float32), s, np.zeros(post, np.float32)])
    if seconds is not None:
        n = int(seconds * RATE)
        s = np.pad(s, (0, max(0, n - len(s))))[:n]
    return mix(s, noise(rng, len(s)), rng.uniform(*snr))


# --- feature helpers shared by the audio entries


def frames(x: np.ndarray, length: int, hop: int) -> np.ndarray:
    n = 1 + max(0, (len(x) - length) // hop)
    return np.lib.stride_tricks.sliding_window_view(x, length, axis=0)[::hop][:n]  # window axis last


def slaney_mel(n_fft: int, n_mels: int, fmin: float = 0.0, fmax: float = RATE / 2) -> np.ndarray:
    """librosa.filters.mel defaults (Slaney scale, Slaney area norm) as ``[n_fft//2+1, n_mels]``."""

    def hz2mel(f: np.ndarray) -> np.ndarray:
        f = np.asarray(f, np.float64)
        log_part = 15.0 + np.log(np.maximum(f, 1e-9) / 1000.0) / (np.log(6.4) / 27.0)
        return np.where(f >= 1000.0, log_part, 3.0 * f / 200.0)

    def mel2hz(m: np.ndarray) -> np.ndarray:
        return np.where(m >= 15.0, 1000.0 * np.exp(np.log(6.4) / 27.0 * (m - 15.0)), 200.0 * m / 3.0)

    pts = mel2hz(np.linspace(hz2mel(np.array(fmin)), hz2mel(np.array(fmax)), n_mels + 2))
    ramps = pts[:, None] - np.fft.rfftfreq(n_fft, 1 / RATE)[None, :]
    fd = np.diff(pts)
    w = np.maximum(0, np.minimum(-ramps[:-2] / fd[:-1, None], ramps[2:] / fd[1:, None]))
    return (w * (2.0 / (pts[2:] - pts[:-2]))[:, None]).T


def _kaldi_mel(n_fft: int = 512, n_mels: int = 80, low: float = 20.0) -> np.ndarray:
    mel = lambda f: 1127.0 * np.log(1.0 + np.asarray(f) / 700.0)  # noqa: E731
    edges = np.linspace(mel(low), mel(RATE / 2), n_mels + 2)
    m = mel(np.fft.rfftfreq(n_fft, 1 / RATE))[None, :]
    left, centre, right = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    w = np.maximum(0, np.minimum((m - left) / (centre - left), (right - m) / (right - centre)))
    w[:, -1] = 0  # kaldi's bank covers bins 0..n_fft/2-1 only
    return w.T


def kaldi_fbank(x: np.ndarray) -> np.ndarray:
    """kaldi_native_fbank as funasr_onnx configures it: 25/10 ms, hamming, dither 0, snip_edges, int16 scale."""
    f = frames(x.astype(np.float64) * 32768.0, 400, 160).copy()
    f -= f.mean(axis=1, keepdims=True)  # remove_dc_offset
    f[:, 1:] -= 0.97 * f[:, :-1].copy()  # preemphasis, first sample against itself
    f[:, 0] *= 1 - 0.97
    f *= 0.54 - 0.46 * np.cos(2 * np.pi * np.arange(400) / 399)
    power = np.abs(np.fft.rfft(f, 512, axis=1)) ** 2
    return np.log(np.maximum(power @ _kaldi_mel(), np.finfo(np.float32).eps)).astype(np.float32)


def load_helper(folder: Path, filename: str) -> ModuleType:
    """Import a pure-numpy helper module shipped in the wheel (extracted beside the model) by its file name."""
    return _load_module(str(find(folder, filename)))


@functools.lru_cache(maxsize=16)
def _load_module(file: str) -> ModuleType:
    path = Path(file)
    spec = importlib.util.spec_from_file_location(f"_corpus_helper_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def find(folder: Path, filename: str) -> Path:
    """A file extracted beside the model: directly in ``folder`` or below it under its wheel path."""
    name = Path(filename).name
    direct = Path(folder) / name
    if direct.exists():
        return direct
    hits = sorted(Path(folder).rglob(name))
    if not hits:
        raise FileNotFoundError(f"{name} not found in {folder}")
    return hits[0]
