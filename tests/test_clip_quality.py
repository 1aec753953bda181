"""The dataset quality gate: per-clip scores, verdicts against each speaker, and preprocessing
that keeps dropped clips out of training."""

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from tests.fixtures_audio import SR, espeak_speech, voiced_clip, write_corpus
from training import clip_quality as Q
from training.audio import pitch
from training.preprocess import preprocess_corpus


def _scores(rate=12.0, snr=40.0, voiced=0.6, **extra) -> dict:
    return {
        "duration_s": 3.0,
        "voiced_share": voiced,
        "voiced_s": 3.0 * voiced,
        "snr_db": snr,
        "level_dbfs": -23.0,
        "peak": 0.5,
        "clipped_share": 0.0,
        "phonemes": int(rate * 1.8),
        "rate": rate,
        **extra,
    }


def _speaker(n=12, seed=0):
    """n ordinary clips of one voice: rates and embeddings with a little natural spread."""
    rng = np.random.default_rng(seed)
    voice = rng.normal(size=256)
    scores, embeddings = {}, {}
    for i in range(n):
        scores[f"c{i}"] = _scores(rate=12.0 * float(np.exp(rng.normal(0, 0.08))))
        embeddings[f"c{i}"] = voice + rng.normal(0, 0.25, 256)
    return scores, embeddings, voice


def _judge(scores, embeddings, overrides=None):
    return Q.judge(scores, {i: "spk" for i in scores}, embeddings, overrides)


def test_ordinary_clips_are_kept():
    scores, embeddings, _ = _speaker()
    verdicts = _judge(scores, embeddings)
    assert {v.verdict for v in verdicts.values()} == {"keep"}


@pytest.mark.parametrize(
    ("bad", "verdict", "code"),
    [
        (_scores(voiced=0.0, snr=2.0), "drop", "no_speech"),
        (_scores(snr=6.0), "drop", "noisy"),
        (_scores(rate=5.0), "drop", "transcript_truncated"),  # 42 % of the usual rate
        (_scores(rate=24.0), "review", "transcript_mismatch"),
    ],
)
def test_each_fault_gets_its_verdict_and_reason_in_words(bad, verdict, code):
    scores, embeddings, voice = _speaker()
    # Noise does not sound like the speaker; the other faults keep the speaker's voice.
    noise = np.random.default_rng(7).normal(size=256)
    scores["bad"], embeddings["bad"] = bad, noise if code == "no_speech" else voice
    v = _judge(scores, embeddings)["bad"]
    assert (v.verdict, Q.primary_kind(v)) == (verdict, code)
    assert len(v.reasons[0]["message"]) > 20  # a sentence, not a code


def test_speech_drowned_in_noise_is_noisy_not_silent():
    scores, embeddings, voice = _speaker()
    scores["drowned"], embeddings["drowned"] = _scores(voiced=0.01, snr=7.0), voice
    v = _judge(scores, embeddings)["drowned"]
    assert (v.verdict, Q.primary_kind(v)) == ("drop", "noisy")


def test_another_voice_is_sent_to_review():
    scores, embeddings, _ = _speaker()
    scores["other"] = _scores()
    embeddings["other"] = np.random.default_rng(9).normal(size=256)
    v = _judge(scores, embeddings)["other"]
    assert v.verdict == "review" and Q.primary_kind(v) == "other_speaker"
    assert v.similarity < 0.5


def test_noise_is_named_before_the_voice_and_text_it_blurs():
    scores, embeddings, _ = _speaker()
    scores["noisy"] = _scores(snr=9.0, rate=30.0)
    embeddings["noisy"] = np.random.default_rng(3).normal(size=256)
    assert Q.primary_kind(_judge(scores, embeddings)["noisy"]) == "noisy"


def test_word_error_rate_is_judged_against_the_speakers_own():
    # A voice the recogniser hears well: a wrong transcript stands out.
    scores, embeddings, _ = _speaker()
    for i, s in enumerate(scores.values()):
        s.update(Q.asr_scores("the cat sat on the mat", "the cat sat on a mat" if i % 3 else ""))
        s["wer"] = 0.0 if i % 3 else 0.17
    scores["swapped"] = dict(
        _scores(), **Q.asr_scores("the cat sat on the mat", "rain fell all night")
    )
    embeddings["swapped"] = embeddings["c0"]
    assert Q.primary_kind(_judge(scores, embeddings)["swapped"]) == "transcript_mismatch"
    # A voice it hears badly everywhere: the same WER is that speaker's normal, not a fault.
    for s in scores.values():
        s["wer"] = 0.95
    assert _judge(scores, embeddings)["swapped"].verdict == "keep"


def test_review_decisions_win_except_for_a_clip_with_no_speech():
    scores, embeddings, voice = _speaker()
    scores["quiet"] = _scores(voiced=0.0, snr=1.0)
    embeddings["quiet"] = np.random.default_rng(8).normal(size=256)
    scores["slow"], embeddings["slow"] = _scores(rate=5.0), voice
    verdicts = _judge(scores, embeddings, {"slow": "keep", "c1": "drop", "quiet": "keep"})
    assert verdicts["slow"].verdict == "keep"
    assert verdicts["c1"].verdict == "drop"
    assert verdicts["c1"].reasons[0]["code"] == "reviewed_drop"
    assert verdicts["quiet"].verdict == "drop"


def test_scores_of_a_voiced_clip_and_of_noise():
    voiced = torch.from_numpy(voiced_clip(150, 1.5, seed=1))
    noise = torch.from_numpy(np.random.default_rng(0).normal(0, 0.1, SR * 2).astype(np.float32))
    good = Q.score_clip(voiced, voiced, pitch(voiced, SR), SR, list("hello"))
    bad = Q.score_clip(noise, noise, pitch(noise, SR), SR, list("hello"))
    assert good["voiced_share"] > 0.5 and bad["voiced_share"] < Q.MIN_VOICED_SHARE
    assert good["snr_db"] > 30 and bad["snr_db"] < 10
    assert good["phonemes"] == 5 and good["rate"] > 0


def test_phonemes_are_counted_without_breaks_punctuation_or_stress():
    from training.text import WORD

    assert Q.count_phonemes(["h", "ˈ", "ɛ", "l", "oʊ", WORD, "w", "ɜː", "l", "d", "!"]) == 8


def test_the_corpus_language_model_lets_pocketsphinx_hear_its_sentences(tmp_path):
    pytest.importorskip("pocketsphinx")
    texts = ["The cat sat on the mat.", "Rain fell all night.", "We walked home slowly."]
    arpa = Q.corpus_language_model(texts)
    assert (
        arpa.startswith("\\data\\") and "\\2-grams:" in arpa and arpa.rstrip().endswith("\\end\\")
    )
    (tmp_path / "lm.arpa").write_text(arpa)
    recogniser = Q.CorpusRecogniser(tmp_path / "lm.arpa")
    wav, sr = espeak_speech("Rain fell all night.")
    heard = recogniser.transcribe(torch.from_numpy(wav), sr)
    recogniser.close()
    recogniser.close()  # twice is harmless
    assert Q.word_error_rate("Rain fell all night.", heard) <= 0.5, heard
    assert Q.word_error_rate("We walked home slowly.", heard) >= 0.75


def _write(path: Path, wav: np.ndarray) -> Path:
    sf.write(path, wav, SR)
    return path


def test_preprocessing_never_trains_on_a_noise_only_clip_and_reports_it(tmp_path):
    from training.corpus import CorpusItem

    items = write_corpus(tmp_path / "audio", 12)
    noise = np.random.default_rng(4).normal(0, 0.05, SR * 2).astype(np.float32)
    items.append(
        CorpusItem("low_noise", _write(tmp_path / "noise.wav", noise), "The cat sat.", "low")
    )
    # A valid WAV header with random bytes after it: decodes, as loud noise.
    junk = tmp_path / "junk.wav"
    _write(junk, np.zeros(SR, np.float32))
    raw = bytearray(junk.read_bytes())
    raw[44:] = np.random.default_rng(5).integers(0, 256, len(raw) - 44, dtype=np.uint8).tobytes()
    junk.write_bytes(bytes(raw))
    items.append(CorpusItem("high_junk", junk, "A bird sings.", "high"))

    result = preprocess_corpus(items, tmp_path / "cache", lang="en")
    trained = {
        json.loads(line)["id"]
        for line in (tmp_path / "cache" / "items.jsonl").read_text().splitlines()
    }
    assert "low_noise" not in trained and "high_junk" not in trained
    assert len(trained) == 12
    assert result.verdicts["low_noise"]["verdict"] == "drop"
    assert result.verdicts["low_noise"]["reasons"][0]["code"] == "no_speech"
    assert result.left_out.get("no_speech", 0) + result.left_out.get("noisy", 0) == 2
    codes = {p.item_id: p.code for p in result.problems}
    assert codes["low_noise"] == "quality_drop"
    written = (tmp_path / "cache" / "quality" / "verdicts.jsonl").read_text().splitlines()
    assert len(written) == 14

    # A person's decision at the next run: nothing is extracted again, the verdict follows it.
    again = preprocess_corpus(items, tmp_path / "cache", lang="en", overrides={"low_02": "drop"})
    assert again.reused == again.kept == 11
    assert again.verdicts["low_02"]["verdict"] == "drop"


# ------------------------------------------------------------------ transcripts by alignment

SENTENCE = "The quiet teacher collected two loaves of bread under the bright lights."


def _aligned(text: str, said: str = SENTENCE) -> dict:
    """Alignment scores of espeak saying `said`, checked against the transcript `text`."""
    from training.audio import normalise_loudness, resample, trim_silence
    from training.text import Frontend

    wav, sr = espeak_speech(said)
    trimmed = normalise_loudness(trim_silence(torch.from_numpy(wav), sr))
    f0 = pitch(trimmed, sr)
    phonemes = Frontend("en").tokens(text)
    return Q.alignment_scores(resample(trimmed, sr, 16000), 16000, text, phonemes, f0)


def test_the_own_transcript_aligns_and_a_truncated_one_leaves_speech_after_its_end():
    pytest.importorskip("pocketsphinx")
    own = _aligned(SENTENCE)
    assert own["align"] == "ok", own
    assert own["untranscribed_s"] < Q.UNTRANSCRIBED_VOICED_S
    assert own["tail_share"] < 0.1 and own["longest_sound_s"] < Q.STRETCHED_PHONE_S

    cut = _aligned("The quiet teacher collected two loaves.")
    assert cut["align"] == "ok", cut
    assert cut["tail_share"] >= Q.TRUNCATED_TAIL_SHARE
    assert cut["tail_voiced_s"] >= Q.UNTRANSCRIBED_VOICED_S


def test_another_clips_transcript_does_not_fit():
    pytest.importorskip("pocketsphinx")
    other = _aligned("What a lovely surprise that was!")
    misfit = (
        other["align"] == "failed"
        or other["untranscribed_s"] >= Q.UNTRANSCRIBED_VOICED_S
        or other["longest_sound_s"] >= Q.STRETCHED_PHONE_S
    )
    assert misfit, other


def test_a_word_the_dictionary_lacks_is_pronounced_from_the_front_end():
    pytest.importorskip("pocketsphinx")
    assert Q.arpabet("bʌɾɚ") == "B AH T ER"
    assert Q.arpabet("tʃɜːtʃ") == "CH ER CH"
    text = "Zorbulax collected two loaves of bread."
    scores = _aligned(text, said=text)
    assert scores["align"] == "ok", scores
    assert scores["untranscribed_s"] < Q.UNTRANSCRIBED_VOICED_S


def _aligned_speaker(n=10):
    scores, embeddings, voice = _speaker(n)
    for s in scores.values():
        s.update(align="ok", untranscribed_s=0.0, tail_s=0.05, tail_share=0.02,
                 tail_voiced_s=0.0, longest_sound_s=0.15, longest_word="bread")  # fmt: skip
    return scores, embeddings, voice


@pytest.mark.parametrize(
    ("alignment", "verdict", "code"),
    [
        ({"align": "failed"}, "drop", "transcript_mismatch"),
        ({"untranscribed_s": 0.9, "tail_share": 0.05}, "drop", "transcript_mismatch"),
        (
            {"untranscribed_s": 0.8, "tail_s": 1.2, "tail_share": 0.45, "tail_voiced_s": 0.8},
            "drop",
            "transcript_truncated",
        ),
        ({"longest_sound_s": 0.6, "longest_word": "a"}, "review", "transcript_mismatch"),
    ],
)
def test_alignment_faults_get_their_verdicts_even_at_an_ordinary_speaking_rate(
    alignment, verdict, code
):
    scores, embeddings, voice = _aligned_speaker()
    scores["bad"] = dict(scores["c0"], **alignment)
    embeddings["bad"] = voice
    v = _judge(scores, embeddings)["bad"]
    assert (v.verdict, Q.primary_kind(v), v.text_check) == (verdict, code, "alignment")
    assert len(v.reasons[0]["message"]) > 30
    assert _judge(scores, embeddings)["c1"].verdict == "keep"


def test_alignment_is_not_trusted_for_a_voice_whose_clips_mostly_fail():
    # A voice (or a tone, or another language) the acoustic model cannot follow: every clip
    # failing says nothing about any one transcript, so the older checks judge instead.
    scores, embeddings, _ = _aligned_speaker()
    for s in scores.values():
        s["align"] = "failed"
    verdicts = _judge(scores, embeddings)
    assert {v.verdict for v in verdicts.values()} == {"keep"}
    assert {v.text_check for v in verdicts.values()} == {"rate"}


def test_preprocessing_drops_a_swapped_transcript_the_speaking_rate_cannot_see(tmp_path):
    pytest.importorskip("pocketsphinx")
    from training.corpus import CorpusItem

    sentences = [
        "The quiet teacher collected two loaves of bread.",
        "Every student carried a jar of honey home.",
        "Her brother ignored the broken umbrella again.",
        "A young doctor explained the strange noise.",
        "The pilot repaired seven yellow envelopes.",
    ]
    # Clips 1 and 3, of similar length, trade transcripts.
    written = [sentences[i] for i in (0, 3, 2, 1, 4)]
    items = []
    for i, (said, text) in enumerate(zip(sentences, written, strict=True)):
        wav, _ = espeak_speech(said)
        items.append(CorpusItem(f"s{i}", _write(tmp_path / f"s{i}.wav", wav), text, "voice"))
    result = preprocess_corpus(items, tmp_path / "cache", lang="en")
    for swapped in ("s1", "s3"):
        v = result.verdicts[swapped]
        assert v["verdict"] in ("review", "drop"), v
        assert v["reasons"][0]["code"] == "transcript_mismatch" and v["text_check"] == "alignment"
    assert all(result.verdicts[i]["verdict"] == "keep" for i in ("s0", "s2", "s4"))
