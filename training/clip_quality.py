"""The dataset quality gate: scores for every clip, then a verdict (keep / review / drop) with reasons.

Two stages, because the fair threshold for a clip depends on its speaker:

1. `score_clip` runs inside a preprocessing worker on one clip, next to the features, and returns
   plain numbers: voiced share, an SNR estimate, level and clipping, speaking rate in phonemes
   per voiced second and, for English, how the clip's own transcript force-aligns to it
   (`alignment_scores`). The speaker embedding that preprocessing makes anyway is the only
   other input the second stage needs.
2. `judge` runs once over the whole corpus: each speaker's own median and spread of speaking
   rate, word error rate and distance from the speaker's centroid decide what is unusual *for
   that voice*, so a fast talker or a voice pocketsphinx hears badly is not punished as a whole.

Transcripts are checked by forced alignment, not by recognition: on voices pocketsphinx hears
badly (dev-en-8spk's three espeak voices: median WER 0.3-0.55 on correct transcripts) a word
error rate cannot tell a wrong transcript from a right one, but the alignment still can: a
wrong one fails to fit, or leaves voiced speech outside every word, or stretches a word over
seconds. It also costs a third of recognition. What pocketsphinx hears (a bigram model of the
dataset's own transcripts, one search pass, pruned beams) is kept for the clips sent to review,
where it helps a person fix the text, and judges transcripts only where alignment cannot
(another language has no alignment; a voice whose clips mostly fail to align is not trusted).

Cost (bench/quality_gate.py, one thread): today's preprocessing ~40 ms of CPU a clip; alignment
~18 ms; recognition ~55 ms, DNSMOS ~3.5 s (speechmos loops every clip to its 9 s window). So
DNSMOS is not run per clip: the SNR estimate and the voicing separate the injected noise faults
on their own (100 % recall and precision); `judge` still names a low DNSMOS BAK where a caller
supplies one as "dnsmos_bak".
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import math
import tempfile
import threading
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from training.text import word_error_rate, words

ASR_SAMPLE_RATE = 16000

# What counts as unusual. Relative limits are in robust standard deviations (1.4826 * MAD) of
# the speaker's own clips; the absolute floor/ceiling keeps a very consistent speaker (tiny
# spread) from having every slight wobble flagged.
MIN_VOICED_SHARE = 0.025  # speech: 15-80 % voiced frames (by voice); noise and hum: 0 %
MIN_VOICED_SECONDS = 0.1
# Noise-only clips score 0.43-0.52 against their speaker's centroid, speech under 0-5 dB of
# noise 0.63-0.75 and clean clips 0.86 and up (dev-en-8spk, bench/quality_gate.py).
NO_SPEECH_MAX_SIMILARITY = 0.58
# A clip is noisy when it is both noisier than its speaker's usual (by SNR_BELOW_MEDIAN_DB) and
# below an absolute level: a speaker whose every clip has the same hum is that speaker's
# recording, shown in the score pictures, not a fault of one clip.
SNR_DROP_DB = 15.0  # clean clips of dev-en-8spk: 21 dB and up; 0-5 dB added noise: 5-12 dB
SNR_REVIEW_DB = 18.0
SNR_BELOW_MEDIAN_DB = 10.0
SPEAKER_SPREADS = 5.0
SPEAKER_MAX_SIMILARITY = 0.80  # flagged only below this cosine to the centroid, spread or not
RATE_LOW = 0.63  # transcript holds < 63 % of the phonemes the speaker's usual rate predicts
RATE_HIGH = 1.6
# Clips whose rate ratio lies inside this band are not heard by pocketsphinx in the default
# "inconclusive" mode: the rate gives no reason to doubt their transcript.
ASR_BAND = (0.8, 1.25)
CALIBRATION_CLIPS = 8
WER_SPREADS = 4.0
WER_FLOOR = 0.5
WER_TRUSTED = 0.8  # a speaker whose limit lands above this is one pocketsphinx hears badly
TRUNCATED_HEARD_RATIO = 1.3  # heard words / transcript words above this: the text stops early
TRUNCATED_PREFIX_WER = 0.5  # ... and it matches the start of what was heard
MIN_CLIPS_FOR_SPEAKER_STATS = 8  # fewer: medians and spreads say too little
# Forced alignment of the clip's own transcript (TranscriptAligner). On dev-en-8spk
# (bench/quality_gate.py, seeds 0 and 1) clean clips have at most 0.16 s of voiced speech
# outside the aligned words, no word longer than 0.27 s a sound, and end at most 0.2 s after
# their last word (the clip is trimmed, so what follows it is sound, not silence); truncated
# transcripts leave 0.5-3 s after it (21-81 % of the clip), and another clip's transcript
# mostly fails to align, else leaves 0.4-1 s of speech unaccounted for or stretches a word.
# The pitch tracker's voicing undercounts some voices (two espeak voices: 0.02 s voiced in a
# 0.5 s tail of speech), so the tail is judged by its length, the rest by voiced speech.
UNTRANSCRIBED_VOICED_S = 0.3
UNTRANSCRIBED_DROP_S = 0.6
TRUNCATED_TAIL_S = 0.45
TRUNCATED_TAIL_SHARE = 0.2
STRETCHED_PHONE_S = 0.3
# Alignment judges a speaker's transcripts only when most of that speaker's clips align
# cleanly: a voice (or a language, or a test tone) the US-English acoustic model cannot
# follow would otherwise have every transcript called wrong.
ALIGN_TRUSTED_SHARE = 0.5
ALIGN_TRUSTED_MIN = 3

REASON_KINDS = {
    "no_speech": "no speech",
    "noisy": "heavy noise",
    "other_speaker": "another voice",
    "transcript_truncated": "truncated transcript",
    "transcript_mismatch": "transcript does not match",
    "speaking_rate": "odd speaking rate",
    "reviewed_drop": "dropped in review",
}


@dataclass
class Verdict:
    verdict: str  # keep | review | drop
    reasons: list  # [{"code", "message"}], worst first
    badness: float  # for the review queue's order: higher is worse
    similarity: float | None = None
    rate_ratio: float | None = None
    # What judged the transcript: "alignment", "asr" (word error rate), "rate" or "".
    text_check: str = ""

    def to_dict(self) -> dict:
        return {
            "verdict": self.verdict,
            "reasons": self.reasons,
            "badness": round(self.badness, 4),
            "similarity": None if self.similarity is None else round(self.similarity, 4),
            "rate_ratio": None if self.rate_ratio is None else round(self.rate_ratio, 4),
            "text_check": self.text_check,
        }


# ------------------------------------------------------------------ per clip (in a worker)


def count_phonemes(tokens) -> int:
    """Sounds in the front-end's tokens: word breaks, punctuation and stress marks left out."""
    from training.text import _STRESS, EN_PUNCT, FA_PUNCT, WORD

    skip = set(EN_PUNCT) | set(FA_PUNCT) | set(_STRESS) | {WORD, " "}
    return sum(1 for t in tokens if t not in skip)


def snr_estimate(wav: torch.Tensor, sr: int) -> float:
    """Speech against non-speech frames, in dB: loud frames (95th percentile of 25 ms frame
    energies) against the quiet ones (10th percentile). A clip with no pause at all reads
    low, which is why the limits are also judged against the speaker's own median."""
    x = wav.float().flatten()
    frame = max(1, int(0.025 * sr))
    if x.numel() < frame * 4:
        return 0.0
    frames = x[: x.numel() // frame * frame].reshape(-1, frame)
    energy = frames.pow(2).mean(dim=1).clamp_min(1e-12)
    db = 10 * torch.log10(energy)
    return float(torch.quantile(db, 0.95) - torch.quantile(db, 0.10))


def level_dbfs(wav: torch.Tensor) -> float:
    rms = float(wav.float().pow(2).mean().sqrt())
    return 20 * math.log10(max(rms, 1e-10))


def score_clip(
    raw: torch.Tensor,
    trimmed: torch.Tensor,
    f0: torch.Tensor,
    sr: int,
    phonemes,
) -> dict:
    """The cheap scores of one clip. `raw` is the decoded clip, `trimmed` the trimmed and
    loudness-normalised one the features come from, `f0` its pitch track (0 = unvoiced)."""
    voiced = f0 > 0
    frames = max(int(f0.numel()), 1)
    voiced_seconds = float(voiced.sum()) * (trimmed.numel() / sr) / frames
    n_ph = count_phonemes(phonemes)
    scores = {
        "duration_s": round(trimmed.numel() / sr, 4),
        "voiced_share": round(float(voiced.float().mean()) if f0.numel() else 0.0, 4),
        "voiced_s": round(voiced_seconds, 4),
        "snr_db": round(snr_estimate(raw, sr), 2),
        "level_dbfs": round(level_dbfs(raw), 2),
        "peak": round(float(raw.abs().max()) if raw.numel() else 0.0, 4),
        "clipped_share": round(float((raw.abs() >= 0.999).float().mean()), 5),
        "phonemes": n_ph,
        "rate": round(n_ph / max(voiced_seconds, 0.1), 3),
    }
    return scores


def asr_scores(text: str, heard: str) -> dict:
    written, said = words(text), words(heard)
    return {
        "heard": heard,
        "wer": round(_wer(text, heard), 4),
        "heard_words": len(said),
        "text_words": len(written),
        # The transcript against the start of what was heard: near 0 when the text is the
        # beginning of the recording (truncated), near 1 when it is another sentence.
        "prefix_wer": round(_wer(text, " ".join(said[: len(written) + 1])), 4),
    }


def asr_targets(cheap: dict[str, Verdict], speakers: dict[str, str], mode: str) -> set[str]:
    """The clips pocketsphinx should hear. "all": every one. "inconclusive": where alignment
    judged the transcript, the clips it sends to review (what was heard goes into the
    message); elsewhere those whose transcript the speaking rate leaves in doubt, plus a few
    ordinary clips of each such speaker (CALIBRATION_CLIPS, picked by a stable hash of the id)
    so the speaker's own word error rate is known and the doubtful ones can be judged
    against it."""
    import hashlib

    if mode == "all":
        return set(cheap)
    if mode != "inconclusive":
        return set()
    targets = {i for i, v in cheap.items() if needs_asr(v)}
    ordinary: dict[str, list[str]] = defaultdict(list)
    for i, v in cheap.items():
        # Alignment judges without the speaker's word error rate: no calibration needed.
        if i not in targets and v.verdict == "keep" and v.text_check != "alignment":
            ordinary[speakers.get(i, "")].append(i)
    for ids in ordinary.values():
        ids.sort(key=lambda i: hashlib.sha1(i.encode("utf-8")).hexdigest())
        targets.update(ids[:CALIBRATION_CLIPS])
    return targets


def needs_asr(cheap: Verdict) -> bool:
    """Whether the cheap scores leave a clip's transcript in doubt: its speaking rate is off
    the speaker's usual (or the speaker has too few clips to know), and nothing worse (no
    speech, noise, another voice) already decides it."""
    if cheap.verdict != "keep" and primary_kind(cheap) in ("no_speech", "noisy", "other_speaker"):
        return False
    if cheap.text_check == "alignment":
        # Alignment already decided; what pocketsphinx hears only goes into the message a
        # person reads in the review queue, so only for the clips sent there: recognising
        # every dropped one too would cost more than the rest of the gate (55 ms a clip).
        return cheap.verdict == "review" and primary_kind(cheap).startswith("transcript_")
    ratio = cheap.rate_ratio
    return ratio is None or not (ASR_BAND[0] <= ratio <= ASR_BAND[1])


# ------------------------------------------------------------------ the recogniser


def _wer(reference: str, hypothesis: str) -> float:
    # A transcript with no English words (digits only after normalising fails earlier) counts
    # as fully misheard when anything was heard, so the gate never raises on one clip.
    if not words(reference):
        return 0.0 if not words(hypothesis) else 1.0
    return word_error_rate(reference, hypothesis)


def asr_available() -> bool:
    return importlib.util.find_spec("pocketsphinx") is not None


def _pocketsphinx_model_dir() -> Path:
    spec = importlib.util.find_spec("pocketsphinx")
    return Path(next(iter(spec.submodule_search_locations))) / "model" / "en-us"


def dictionary_words() -> set[str]:
    """Words the bundled US-English pronunciation dictionary knows (alternates folded)."""
    known = set()
    path = _pocketsphinx_model_dir() / "cmudict-en-us.dict"
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            word = line.split(" ", 1)[0]
            known.add(word.split("(", 1)[0])
    return known


def corpus_language_model(texts, known: set[str] | None = None) -> str:
    """An ARPA bigram model of the dataset's own transcripts (absolute discounting, back-off to
    unigrams), words the dictionary lacks left out. Decoding against it is fast and hears a
    matching transcript almost word for word; a mismatched one still comes out far away."""
    known = dictionary_words() if known is None else known
    uni: Counter = Counter()
    bi: Counter = Counter()
    for text in texts:
        toks = ["<s>"] + [w for w in words(text) if w in known] + ["</s>"]
        uni.update(toks)
        bi.update(itertools.pairwise(toks))
    discount = 0.5
    followers: Counter = Counter()
    context: Counter = Counter()
    for (a, _), n in bi.items():
        context[a] += n
        followers[a] += 1
    total = sum(n for w, n in uni.items() if w != "<s>") or 1
    lines = ["\\data\\", f"ngram 1={len(uni)}", f"ngram 2={len(bi)}", "", "\\1-grams:"]
    for w, n in sorted(uni.items()):
        logp = -99.0 if w == "<s>" else math.log10(n / total)
        backoff = math.log10(discount * followers[w] / context[w]) if context[w] else 0.0
        lines.append(f"{logp:.5f}\t{w}\t{backoff:.5f}")
    lines += ["", "\\2-grams:"]
    for (a, b), n in sorted(bi.items()):
        lines.append(f"{math.log10((n - discount) / context[a]):.5f}\t{a} {b}")
    lines += ["", "\\end\\", ""]
    return "\n".join(lines)


def write_language_model(texts, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="corpus.", suffix=".arpa")
    with open(fd, "w", encoding="utf-8") as f:
        f.write(corpus_language_model(texts))
    return Path(tmp)


class CorpusRecogniser:
    """pocketsphinx against the dataset's language model. It shares the process's aligner
    decoder (same settings, one acoustic model loaded instead of two: 0.6 s less a run)."""

    def __init__(self, lm_path: str | Path):
        import uuid

        self._shared = shared_aligner()
        self._search = f"corpus-{uuid.uuid4().hex[:8]}"
        with self._shared.lock:
            self._shared.tight.add_lm_file(self._search, str(lm_path))

    def close(self) -> None:
        """Free this dataset's language model from the shared decoder: a Celery worker lives
        through many preprocessing runs, and each would otherwise leave its model behind."""
        with self._shared.lock, contextlib.suppress(KeyError):  # closed already
            self._shared.tight.remove_search(self._search)

    def transcribe(self, wav: torch.Tensor, sr: int) -> str:
        pcm = _pcm16k(wav, sr)
        with self._shared.lock:
            decoder = self._shared.tight
            decoder.activate_search(self._search)
            decoder.start_utt()
            decoder.process_raw(pcm, full_utt=True)
            decoder.end_utt()
            hyp = decoder.hyp()
        return hyp.hypstr if hyp is not None else ""


def _pcm16k(wav: torch.Tensor, sr: int) -> bytes:
    """16-bit PCM at pocketsphinx's rate."""
    from training.audio import resample

    x = torch.as_tensor(wav, dtype=torch.float32).reshape(-1)
    if sr != ASR_SAMPLE_RATE:
        x = resample(x, sr, ASR_SAMPLE_RATE)
    # Dither at -60 dBFS: pauses of exact digital silence upset pocketsphinx's noise and
    # mean normalisation (measured: mean WER of one such voice 0.74 -> 0.40). Seeded, so
    # the same clip is always heard the same way.
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(x.numel()))
    x = x + 1e-3 * noise
    return (x.clamp(-1.0, 1.0) * 32767).to(torch.int16).numpy().tobytes()


# espeak-ng's US-English phonemes (training.text's tokens) in the acoustic model's ARPAbet, for
# words its dictionary lacks (names, rare words). Longest match first; marks not listed (stress,
# length on its own, punctuation) are skipped.
_IPA_TO_ARPABET = {
    "aɪɚ": "AY ER", "aɪə": "AY ER", "aʊɚ": "AW ER", "ɔːɹ": "AO R", "ɑːɹ": "AA R",
    "oːɹ": "AO R", "ɪɹ": "IH R", "ɛɹ": "EH R", "ʊɹ": "UH R", "əl": "AH L", "n̩": "AH N",
    "l̩": "AH L", "eɪ": "EY", "aɪ": "AY", "aʊ": "AW", "oʊ": "OW", "əʊ": "OW", "ɔɪ": "OY",
    "iː": "IY", "uː": "UW", "ɑː": "AA", "ɔː": "AO", "ɜː": "ER", "iə": "IY AH", "ɪə": "IH AH",
    "eə": "EH R", "tʃ": "CH", "dʒ": "JH",
    "ə": "AH", "ɐ": "AH", "ʌ": "AH", "ɚ": "ER", "ɜ": "ER", "ɝ": "ER", "ɪ": "IH", "ᵻ": "IH",
    "i": "IY", "ɛ": "EH", "e": "EH", "æ": "AE", "a": "AE", "ɑ": "AA", "ɒ": "AA", "ɔ": "AO",
    "o": "OW", "ʊ": "UH", "u": "UW", "p": "P", "b": "B", "t": "T", "d": "D", "k": "K",
    "ɡ": "G", "g": "G", "f": "F", "v": "V", "θ": "TH", "ð": "DH", "s": "S", "z": "Z",
    "ʃ": "SH", "ʒ": "ZH", "h": "HH", "x": "HH", "ç": "HH", "m": "M", "n": "N", "ŋ": "NG",
    "l": "L", "ɬ": "L", "ɹ": "R", "r": "R", "j": "Y", "w": "W", "ɾ": "T", "ʔ": "T",
}  # fmt: skip
_IPA_LONGEST = max(len(k) for k in _IPA_TO_ARPABET)


def arpabet(ipa: str) -> str:
    """espeak-ng IPA of one word -> space-separated ARPAbet ("" when nothing maps)."""
    out, i = [], 0
    while i < len(ipa):
        for n in range(min(_IPA_LONGEST, len(ipa) - i), 0, -1):
            if ipa[i : i + n] in _IPA_TO_ARPABET:
                out.append(_IPA_TO_ARPABET[ipa[i : i + n]])
                i += n
                break
        else:
            i += 1
    return " ".join(out)


def _word_phonemes(phonemes) -> list[str]:
    """The front-end's tokens grouped into one IPA string a word (breaks, stress, punctuation
    dropped)."""
    from training.text import _STRESS, EN_PUNCT, WORD

    groups: list[str] = []
    cur: list[str] = []
    for t in [*phonemes, WORD]:
        if t == WORD:
            if cur:
                groups.append("".join(cur))
            cur = []
        elif t not in _STRESS and t not in EN_PUNCT:
            cur.append(t)
    return groups


class TranscriptAligner:
    """Forced alignment of a clip's own transcript with pocketsphinx (US-English model).

    Much cheaper than recognition (~20 ms of CPU a clip against ~55 ms, on dev-en-8spk) and,
    unlike a word error rate, still telling on voices the recogniser hears badly: a transcript
    that does not belong to the audio either cannot be fitted at all, or leaves voiced speech
    outside every word (the untranscribed rest of a truncated text lands after its last word),
    or stretches a word over seconds. Tight beams: a clip that fails with them is not tried again
    with loose ones, which on dev-en-8spk rescued one clean clip in 656 (sending it to review
    instead of dropping it) for 20 ms more on every failing clip, and fitted some wrong ones."""

    def __init__(self):
        from pocketsphinx import Decoder

        self.lock = threading.Lock()
        # No language model (alignment needs none; loading the default one costs 0.15 s a
        # process); every second frame scored, one Gaussian a codebook when tight.
        # The same decoder recognises (CorpusRecogniser): single pass (no fwdflat, no
        # bestpath), tight beams, few words a frame: ~4x faster than the defaults, and the
        # corpus language model keeps matching transcripts near WER 0.
        common = dict(
            samprate=ASR_SAMPLE_RATE,
            loglevel="FATAL",
            fwdflat=False,
            bestpath=False,
            ds=2,
            lm=None,
            maxwpf=5,
        )
        self.tight = Decoder(**common, topn=2, beam=1e-30, wbeam=1e-20, pbeam=1e-30, maxhmmpf=2000)

    def _words(self, text: str, phonemes) -> list[str] | None:
        """The transcript's words, each known to the dictionary (words it lacks are added with
        the front-end's pronunciation); None when a word cannot be pronounced."""
        said = words(text)
        groups = None
        for k, w in enumerate(said):
            if self.tight.lookup_word(w) is not None:
                continue
            if groups is None:
                groups = _word_phonemes(phonemes) if phonemes is not None else []
            # The front end spells the same normalised words, so the k-th group is this word's;
            # when the counts differ, the clip is not aligned rather than aligned wrongly.
            phones = arpabet(groups[k]) if len(groups) == len(said) else ""
            if not phones:
                return None
            self.tight.add_word(w, phones, True)
        return said

    @staticmethod
    def _run(decoder, text: str, pcm: bytes):
        decoder.set_align_text(text)
        decoder.start_utt()
        decoder.process_raw(pcm, full_utt=True)
        decoder.end_utt()
        if decoder.hyp() is None:
            return None
        return [(seg.word, seg.start_frame, seg.end_frame) for seg in decoder.seg()]

    def align(self, trimmed: torch.Tensor, sr: int, text: str, phonemes, f0) -> dict:
        """Alignment scores of one trimmed clip (`f0`: its pitch track, 0 = unvoiced)."""
        with self.lock:
            said = self._words(text, phonemes)
            if not said:
                return {"align": "skipped"}
            pcm = _pcm16k(trimmed, sr)
            segs = self._run(self.tight, " ".join(said), pcm)
            if segs is None:
                return {"align": "failed"}
            phones = {w: len((self.tight.lookup_word(w) or "x").split()) for w, _, _ in segs}
        return _alignment_scores(segs, phones, trimmed.numel() / sr, f0)


def _alignment_scores(segs, phones: dict, seconds: float, f0) -> dict:
    voiced = (torch.as_tensor(f0) > 0).tolist()
    per_f0 = seconds / max(len(voiced), 1)  # seconds a pitch frame

    def voiced_s(start: float, end: float) -> float:
        return sum(voiced[int(start / per_f0) : int(end / per_f0)]) * per_f0

    untranscribed, last_end, longest, stretched = 0.0, 0.0, 0.0, ""
    for word, start, end in segs:
        a, b = start * 0.01, (end + 1) * 0.01  # pocketsphinx frames are 10 ms
        if not word[:1].isalpha():  # <sil>, <s>, fillers: no word of the transcript
            untranscribed += voiced_s(a, b)
            continue
        last_end = b
        per_sound = (b - a) / phones.get(word, 1)
        if per_sound > longest:
            longest, stretched = per_sound, word.split("(", 1)[0]
    tail = max(seconds - last_end, 0.0)
    return {
        "align": "ok",
        "untranscribed_s": round(untranscribed, 3),
        "tail_s": round(tail, 3),
        "tail_share": round(tail / max(seconds, 1e-3), 4),
        "tail_voiced_s": round(voiced_s(last_end, seconds), 3),
        "longest_sound_s": round(longest, 3),
        "longest_word": stretched,
    }


_aligners: dict[int, TranscriptAligner] = {}
_aligners_lock = threading.Lock()


def shared_aligner() -> TranscriptAligner:
    """This process's aligner, made on first use (~0.1 s); a forked child makes its own."""
    import os

    with _aligners_lock:
        aligner = _aligners.get(os.getpid())
        if aligner is None:
            aligner = _aligners[os.getpid()] = TranscriptAligner()
    return aligner


def alignment_scores(trimmed: torch.Tensor, sr: int, text: str, phonemes, f0) -> dict:
    """TranscriptAligner.align's scores, or "skipped" for a clip with hardly a voiced frame:
    no transcript fits noise, and the gate names such a clip for what it is anyway."""
    voiced = torch.as_tensor(f0) > 0
    seconds = trimmed.numel() / sr
    if voiced.numel() == 0 or float(voiced.float().mean()) * seconds < MIN_VOICED_SECONDS:
        return {"align": "skipped"}
    return shared_aligner().align(trimmed, sr, text, phonemes, f0)


# ------------------------------------------------------------------ the corpus (one pass)


def _robust(values) -> tuple[float, float]:
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return 0.0, 0.0
    med = float(np.median(v))
    return med, float(1.4826 * np.median(np.abs(v - med)))


def _cosine(a, b) -> float:
    a = np.asarray(a, dtype=np.float64).reshape(-1)
    b = np.asarray(b, dtype=np.float64).reshape(-1)
    d = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b / d) if d > 0 else 0.0


def judge(
    scores: dict[str, dict],
    speakers: dict[str, str],
    embeddings: dict[str, np.ndarray] | None = None,
    overrides: dict[str, str] | None = None,
) -> dict[str, Verdict]:
    """A verdict for every clip in `scores` (item id -> score_clip's dict).

    `overrides` (item id -> "keep" | "drop") are a person's review decisions: they win.
    """
    embeddings = embeddings or {}
    overrides = overrides or {}
    by_speaker: dict[str, list[str]] = defaultdict(list)
    for item_id in scores:
        by_speaker[speakers.get(item_id, "")].append(item_id)

    out: dict[str, Verdict] = {}
    for ids in by_speaker.values():
        # Clips with no speech would drag a speaker's medians; they are judged on their own.
        speechy = [i for i in ids if not _no_speech(scores[i])]
        enough = len(speechy) >= MIN_CLIPS_FOR_SPEAKER_STATS
        rate_med, _ = _robust(math.log(max(scores[i]["rate"], 1e-3)) for i in speechy)
        snr_med, _ = _robust(scores[i]["snr_db"] for i in speechy)
        # The speaker's own word error rate from clips of ordinary pace: the clips off it are
        # the ones most likely wrong, and heard first, so they would inflate the spread.
        ordinary = [
            i
            for i in speechy
            if scores[i].get("wer") is not None
            and ASR_BAND[0]
            <= math.exp(math.log(max(scores[i]["rate"], 1e-3)) - rate_med)
            <= ASR_BAND[1]
        ]
        heard = ordinary if len(ordinary) >= 5 else speechy
        wer_med, wer_spread = _robust(scores[i].get("wer") for i in heard)
        centroid = None
        embedded = [i for i in speechy if i in embeddings]
        if enough and len(embedded) >= MIN_CLIPS_FOR_SPEAKER_STATS:
            mean = np.mean([embeddings[i] for i in embedded], axis=0)
            centroid = mean / (np.linalg.norm(mean) or 1.0)
        sims = {
            i: _cosine(embeddings[i], centroid)
            for i in ids
            if centroid is not None and i in embeddings
        }
        sim_med, sim_spread = _robust(sims[i] for i in speechy if i in sims)
        tried = [scores[i].get("align") for i in speechy]
        tried = [a for a in tried if a in ("ok", "failed")]
        clean = sum(
            1
            for i in speechy
            if scores[i].get("align") == "ok"
            and scores[i].get("untranscribed_s", 0) < UNTRANSCRIBED_VOICED_S
        )
        limits = {
            "align_trusted": bool(tried)
            and clean >= ALIGN_TRUSTED_MIN
            and clean >= ALIGN_TRUSTED_SHARE * len(tried),
            "sim": min(SPEAKER_MAX_SIMILARITY, sim_med - SPEAKER_SPREADS * max(sim_spread, 0.01)),
            "sim_median": sim_med,
            "wer": max(WER_FLOOR, wer_med + WER_SPREADS * max(wer_spread, 0.05)),
            "snr": snr_med - SNR_BELOW_MEDIAN_DB,
            "snr_median": snr_med,
        }
        for i in ids:
            s = scores[i]
            ratio = math.exp(math.log(max(s["rate"], 1e-3)) - rate_med) if enough else None
            v = _judge_one(s, sims.get(i), ratio, limits, enough)
            decision = overrides.get(i, "")
            if decision == "keep" and primary_kind(v) == "no_speech":
                # A clip with no speech cannot teach a voice anything; a keep cannot save it.
                v.reasons.append(
                    {"code": "reviewed_keep", "message": "kept in review, but has no speech"}
                )
            elif decision == "keep":
                v = Verdict("keep", [], 0.0, v.similarity, v.rate_ratio, v.text_check)
            elif decision == "drop":
                reason = {"code": "reviewed_drop", "message": "dropped by a person in review"}
                v = Verdict(
                    "drop",
                    [reason, *v.reasons],
                    v.badness + 10.0,
                    v.similarity,
                    v.rate_ratio,
                    v.text_check,
                )
            out[i] = v
    return out


def _no_speech(s: dict) -> bool:
    return s["voiced_share"] < MIN_VOICED_SHARE or s["voiced_s"] < MIN_VOICED_SECONDS


def _judge_one(s: dict, sim, ratio, limits: dict, enough: bool) -> Verdict:
    """One clip against its speaker's limits. The worst reason comes first: noise also blurs
    the voice and the recogniser, so a noisy clip is named noisy, not "another voice"."""
    reasons: list[tuple[float, str, str, str]] = []  # (badness, severity, code, words)
    text_check = ""

    def add(badness: float, severity: str, code: str, message: str) -> None:
        reasons.append((badness, severity, code, message))

    snr = s["snr_db"]
    if _no_speech(s) and sim is not None and sim >= NO_SPEECH_MAX_SIMILARITY:
        # Hardly a voiced frame, yet the speaker encoder still hears this voice: speech
        # drowned in noise (the pitch tracker gives up first), not a clip without speech.
        add(
            16.0,
            "drop",
            "noisy",
            f"speech drowned in noise: only {s['voiced_share']:.0%} of the clip is heard as "
            f"voiced, {snr:.0f} dB above the background",
        )
    elif _no_speech(s):
        add(
            20.0,
            "drop",
            "no_speech",
            f"no voiced speech: {s['voiced_share']:.0%} of the clip is voiced "
            f"({s['voiced_s']:.1f} s), where speech is 15-80 %",
        )
    elif snr < SNR_DROP_DB and snr < limits["snr"]:
        add(
            15.0 + (SNR_DROP_DB - snr) / 10,
            "drop",
            "noisy",
            f"heavy noise: speech only {snr:.0f} dB above the background "
            f"(clean recordings: {SNR_DROP_DB + 10:.0f} dB and more)",
        )
    elif snr < SNR_REVIEW_DB and snr < limits["snr"]:
        add(
            12.0,
            "review",
            "noisy",
            f"noisy: speech {snr:.0f} dB above the background, where this speaker's clips "
            f"usually are {limits['snr_median']:.0f} dB",
        )
    if s.get("dnsmos_bak") is not None and s["dnsmos_bak"] < 2.5:
        add(12.0, "review", "noisy", f"DNSMOS hears background noise (BAK {s['dnsmos_bak']:.1f})")
    if reasons:
        pass  # with no speech or heavy noise the other scores say nothing more
    elif sim is not None and sim < limits["sim"]:
        add(
            10.0 + (limits["sim"] - sim) * 10,
            "review",
            "other_speaker",
            f"sounds like another voice: similarity {sim:.2f} to this speaker's usual voice, "
            f"where their clips score {limits['sim_median']:.2f}",
        )
    else:
        text_check = _judge_text(s, ratio, limits, add)
    if s.get("clipped_share", 0) > 0.001:
        add(0.5, "info", "clipping", f"{s['clipped_share']:.1%} of the samples are clipped")
    reasons.sort(key=lambda r: -r[0])
    verdict = "keep"
    if any(r[1] == "drop" for r in reasons):
        verdict = "drop"
    elif any(r[1] == "review" for r in reasons):
        verdict = "review"
    badness = sum(r[0] for r in reasons if r[1] in ("drop", "review"))
    return Verdict(
        verdict,
        [{"code": c, "message": m} for _, _, c, m in reasons],
        badness,
        sim,
        ratio,
        text_check,
    )


def _judge_text(s: dict, ratio, limits: dict, add) -> str:
    """Does the transcript fit the audio: by forced alignment where it is trustworthy for this
    speaker, else by what pocketsphinx heard where that is, else by the speaking rate the
    transcript implies. Returns which of the three judged."""
    if limits.get("align_trusted") and s.get("align") in ("ok", "failed"):
        _judge_alignment(s, add)
        return "alignment"
    wer = s.get("wer")
    heard, written = s.get("heard_words", 0), max(s.get("text_words", 0), 1)
    asr_trusted = wer is not None and limits["wer"] <= WER_TRUSTED
    if asr_trusted and wer <= limits["wer"]:
        return "asr"  # heard as written: an odd rate is this clip's pace, not its text
    if asr_trusted:
        severity = "drop" if wer >= 0.9 else "review"
        starts_alike = s.get("prefix_wer", 1.0) <= TRUNCATED_PREFIX_WER
        if starts_alike and heard / written >= TRUNCATED_HEARD_RATIO:
            add(
                8.0 + wer,
                severity,
                "transcript_truncated",
                f"the transcript seems to stop early: {written} words written, {heard} heard "
                f"(word error rate {wer:.0%})",
            )
        else:
            add(
                8.0 + wer,
                severity,
                "transcript_mismatch",
                f"the transcript does not match what is said (word error rate {wer:.0%}); "
                f"heard: “{s.get('heard', '')[:80]}”",
            )
    elif ratio is not None and ratio < RATE_LOW:
        add(
            6.0 - ratio,
            "drop" if ratio < RATE_LOW * 0.8 else "review",
            "transcript_truncated",
            f"the transcript seems to stop early: it has {ratio:.0%} of the sounds this "
            "speaker's usual rate fits into the audio",
        )
    elif ratio is not None and ratio > RATE_HIGH:
        add(
            5.0 + ratio / 10,
            "review",
            "transcript_mismatch",
            f"the transcript has {ratio:.0%} of the sounds this speaker's usual rate fits into "
            "the audio: it may belong to another clip",
        )
    if wer is not None:
        return "asr"
    return "rate" if ratio is not None else ""


def _judge_alignment(s: dict, add) -> None:
    """The transcript against the audio by forced alignment (TranscriptAligner's scores)."""
    heard = s.get("heard")
    said = f"; heard: “{heard[:80]}”" if heard else ""
    if s["align"] == "failed":
        add(
            9.0,
            "drop",
            "transcript_mismatch",
            "the transcript cannot be fitted to the audio: pocketsphinx finds no way through "
            f"its words{said}",
        )
        return
    untranscribed = s.get("untranscribed_s", 0.0)
    tail_s, tail_share = s.get("tail_s", 0.0), s.get("tail_share", 0.0)
    if tail_s >= TRUNCATED_TAIL_S and tail_share >= TRUNCATED_TAIL_SHARE:
        add(
            8.0 + min(tail_share, 1.0),
            "drop" if tail_share >= 1.5 * TRUNCATED_TAIL_SHARE else "review",
            "transcript_truncated",
            f"the transcript seems to stop early: its last word ends {tail_s:.1f} s before the "
            f"clip does ({tail_share:.0%} of it){said}",
        )
    elif untranscribed >= UNTRANSCRIBED_VOICED_S:
        add(
            8.0 + min(untranscribed, 1.0),
            "drop" if untranscribed >= UNTRANSCRIBED_DROP_S else "review",
            "transcript_mismatch",
            f"{untranscribed:.1f} s of speech fit no word of the transcript: it may belong to "
            f"another clip{said}",
        )
    elif s.get("longest_sound_s", 0.0) >= STRETCHED_PHONE_S:
        add(
            7.0 + s["longest_sound_s"],
            "review",
            "transcript_mismatch",
            f"fitted to this audio, “{s.get('longest_word', '')}” would last "
            f"{s['longest_sound_s']:.2f} s a sound: the transcript may belong to another "
            f"clip{said}",
        )


def primary_kind(verdict: Verdict) -> str:
    """The code of the worst reason, "" for a clip kept: what the benchmark scores per kind."""
    if verdict.verdict == "keep" or not verdict.reasons:
        return ""
    return verdict.reasons[0]["code"]
