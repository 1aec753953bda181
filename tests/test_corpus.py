"""Corpus readers and per-utterance checks, on tiny corpora built here from synthetic audio."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from training.audio import AudioError, load_audio
from training.corpus import (
    FORMATS,
    CorpusItem,
    check_audio,
    corpus_root,
    detect_format,
    read_corpus,
    undecodable,
)

SR = 22050


def speechlike(seconds: float, sr: int = SR, seed: int = 0) -> np.ndarray:
    """A voiced-sounding signal: a few harmonics under a syllable-rate envelope, plus noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    tone = sum(np.sin(2 * np.pi * 140 * k * t) / k for k in range(1, 6))
    envelope = 0.6 + 0.4 * np.sin(2 * np.pi * 4 * t)
    return (0.25 * tone * envelope + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


def write_audio(path: Path, seconds: float = 1.0, sr: int = SR) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, speechlike(seconds, sr), sr)
    return path


def codes(problems) -> list[str]:
    return sorted(p.code for p in problems)


# ---------------------------------------------------------------------------------------------
# One corpus per format


@pytest.fixture
def ljspeech(tmp_path: Path) -> Path:
    root = tmp_path / "LJSpeech-1.1"
    for name in ("LJ001-0001", "LJ001-0002", "LJ001-0003"):
        write_audio(root / "wavs" / f"{name}.wav")
    (root / "metadata.csv").write_text(
        "LJ001-0001|Printing, in 1 sense|Printing, in one sense\n"
        "LJ001-0002|Hello there.|\n"
        "LJ001-0003|\n"
        "LJ001-0004|No audio for this one.|No audio for this one.\n"
        "LJ001-0001|Listed twice.|Listed twice.\n",
        encoding="utf-8",
    )
    return root


@pytest.fixture
def vctk(tmp_path: Path) -> Path:
    root = tmp_path / "VCTK-Corpus-0.92"
    for spk in ("p225", "p226"):
        for n in (1, 2):
            write_audio(root / "wav48_silence_trimmed" / spk / f"{spk}_00{n}_mic1.flac")
            write_audio(root / "wav48_silence_trimmed" / spk / f"{spk}_00{n}_mic2.flac")
            txt = root / "txt" / spk / f"{spk}_00{n}.txt"
            txt.parent.mkdir(parents=True, exist_ok=True)
            txt.write_text(f"Please call Stella, says {spk}.\n")
    # Audio without a transcript (VCTK's p315 really has none) and a transcript without audio.
    write_audio(root / "wav48_silence_trimmed" / "p315" / "p315_001_mic1.flac")
    (root / "txt" / "p225" / "p225_003.txt").write_text("Orphan transcript.")
    return root


@pytest.fixture
def coqui(tmp_path: Path) -> Path:
    root = tmp_path / "mycorpus"
    lines = ["audio_file|text|speaker_name"]
    for spk in ("anna", "ben"):
        for n in range(3):
            write_audio(root / "wavs" / f"{spk}_{n}.wav")
            lines.append(f"wavs/{spk}_{n}.wav|Sentence {n} by {spk}.|{spk}")
    (root / "metadata.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


@pytest.fixture
def commonvoice(tmp_path: Path) -> Path:
    root = tmp_path / "cv-corpus" / "fa"
    client_a, client_b = "a" * 128, "b" * 128
    rows = ["client_id\tpath\tsentence\tup_votes\tdown_votes"]
    for client, clip in ((client_a, "c1"), (client_a, "c2"), (client_b, "c3")):
        write_audio(root / "clips" / f"common_voice_fa_{clip}.ogg")
        rows.append(f'{client}\tcommon_voice_fa_{clip}.ogg\tSay "{clip}" now.\t2\t0')
    (root / "validated.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    (root / "train.tsv").write_text("\n".join(rows[:2]) + "\n", encoding="utf-8")
    return root


def test_ljspeech(ljspeech: Path):
    assert detect_format(ljspeech) == "ljspeech"
    items, problems = read_corpus(ljspeech)
    assert [i.id for i in items] == ["LJ001-0001", "LJ001-0002"]
    # The normalised third column is preferred; an empty one falls back to the raw text.
    assert items[0].text == "Printing, in one sense"
    assert items[1].text == "Hello there."
    assert items[0].audio_path == ljspeech / "wavs" / "LJ001-0001.wav"
    assert codes(problems) == ["duplicate_id", "missing_file", "missing_transcript"]
    dup = next(p for p in problems if p.code == "duplicate_id")
    assert dup.severity == "error" and "line 5" in dup.message and "line 1" in dup.message
    missing = next(p for p in problems if p.code == "missing_file")
    assert missing.item_id == "LJ001-0004" and "does not exist" in missing.message


def test_vctk(vctk: Path):
    assert detect_format(vctk) == "vctk"
    items, problems = read_corpus(vctk)
    assert sorted(i.id for i in items) == ["p225_001", "p225_002", "p226_001", "p226_002"]
    assert {i.speaker for i in items} == {"p225", "p226"}
    # Of the two microphones, mic1 is read.
    assert all(i.audio_path.stem.endswith("_mic1") for i in items)
    assert items[0].text == "Please call Stella, says p225."
    by_id = {p.item_id: p for p in problems}
    assert by_id["p315_001"].code == "missing_transcript"
    assert by_id["p225_003"].code == "missing_file"
    assert "no audio file" in by_id["p225_003"].message


def test_coqui(coqui: Path):
    assert detect_format(coqui) == "coqui"
    items, problems = read_corpus(coqui)
    assert problems == []
    assert len(items) == 6
    assert {i.speaker for i in items} == {"anna", "ben"}
    # Ids drop the folder every path shares, so they stay short and unique.
    assert items[0].id == "anna_0"


def test_a_quoted_comma_stays_in_the_transcript(tmp_path: Path):
    root = tmp_path / "commas"
    write_audio(root / "wavs" / "a.wav")
    write_audio(root / "wavs" / "b.wav")
    (root / "metadata.csv").write_text(
        'audio_file,text,speaker_name\nwavs/a.wav,"Hello, world.",anna\nwavs/b.wav,Plain text.,ben\n',
        encoding="utf-8",
    )
    items, problems = read_corpus(root, "coqui")
    assert problems == []
    assert [(i.text, i.speaker) for i in items] == [
        ("Hello, world.", "anna"),
        ("Plain text.", "ben"),
    ]


def test_commonvoice(commonvoice: Path):
    assert detect_format(commonvoice) == "commonvoice"
    items, problems = read_corpus(commonvoice)
    assert problems == []
    # validated.tsv is read; train.tsv repeats some of it and must not cause duplicates.
    assert sorted(i.id for i in items) == [f"common_voice_fa_c{n}" for n in (1, 2, 3)]
    assert {i.speaker for i in items} == {"a" * 16, "b" * 16}
    assert items[0].text == 'Say "c1" now.'


def test_shared_dev_corpus_reads_as_coqui():
    root = Path("/work/shared/corpora/dev-en-8spk")
    if not root.is_dir():
        pytest.skip("the shared development corpus is not on this machine")
    items, problems = read_corpus(root)
    assert problems == []
    assert len(items) == 800 and len({i.speaker for i in items}) == 8


def test_format_can_be_chosen_and_is_checked(coqui: Path):
    assert len(read_corpus(coqui, "coqui")[0]) == 6
    with pytest.raises(ValueError, match="choose one of"):
        read_corpus(coqui, "librispeech")
    assert set(FORMATS) == {"ljspeech", "vctk", "coqui", "commonvoice"}


def test_archive_wrapper_folder_is_looked_through(tmp_path: Path, coqui: Path):
    # An archive "corpus.zip" usually unpacks to extract/<corpus>/...; macOS adds __MACOSX.
    (tmp_path / "__MACOSX").mkdir()
    assert corpus_root(tmp_path) == coqui
    assert detect_format(tmp_path) == "coqui"
    assert len(read_corpus(tmp_path)[0]) == 6


def test_unrecognised_folder_says_what_was_expected(tmp_path: Path):
    write_audio(tmp_path / "random.wav")
    with pytest.raises(ValueError, match=r"LJSpeech .* VCTK .* audio_file\|text\|speaker_name"):
        detect_format(tmp_path)
    with pytest.raises(ValueError, match="is not a folder"):
        detect_format(tmp_path / "random.wav")


# ---------------------------------------------------------------------------------------------
# Hostile metadata


def test_latin1_metadata_is_read_with_a_warning(coqui: Path):
    meta = coqui / "metadata.csv"
    write_audio(coqui / "wavs" / "cafe.wav")
    meta.write_bytes(meta.read_bytes() + "wavs/cafe.wav|Un café crème.|anna\n".encode("latin-1"))
    items, problems = read_corpus(coqui)
    cafe = next(i for i in items if i.id == "cafe")
    assert cafe.text == "Un café crème."
    assert [(p.item_id, p.code, p.severity) for p in problems] == [
        ("cafe", "bad_encoding", "warning")
    ]
    assert "not valid UTF-8" in problems[0].message and "Latin-1" in problems[0].message
    # The UTF-8 lines around it carry no warning.
    assert len(items) == 7


def test_missing_text_column_is_one_clear_error(coqui: Path):
    (coqui / "metadata.csv").write_text("audio_file|speaker_name\nwavs/anna_0.wav|anna\n")
    assert detect_format(coqui) == "coqui"
    items, problems = read_corpus(coqui)
    assert items == []
    assert [(p.code, p.severity) for p in problems] == [("missing_column", "error")]
    assert "no 'text' column" in problems[0].message
    assert "audio_file|text|speaker_name" in problems[0].message


def test_missing_speaker_column_keeps_items_as_one_speaker(coqui: Path):
    (coqui / "metadata.csv").write_text("audio_file|text\nwavs/anna_0.wav|Hello.\n")
    items, problems = read_corpus(coqui)
    assert len(items) == 1 and items[0].speaker == "speaker"
    assert [(p.code, p.severity) for p in problems] == [("missing_column", "warning")]


def test_missing_sentence_column_in_commonvoice(commonvoice: Path):
    (commonvoice / "validated.tsv").write_text("client_id\tpath\nx\tcommon_voice_fa_c1.ogg\n")
    items, problems = read_corpus(commonvoice, "commonvoice")
    assert items == []
    assert "no 'sentence' column" in problems[0].message


def test_zero_byte_and_escaping_paths(coqui: Path, tmp_path: Path):
    (coqui / "wavs" / "empty.wav").write_bytes(b"")
    outside = write_audio(tmp_path / "outside.wav")
    (coqui / "wavs" / "link.wav").symlink_to(outside)
    meta = coqui / "metadata.csv"
    meta.write_text(
        meta.read_text()
        + "wavs/empty.wav|Nothing here.|anna\n"
        + "../outside.wav|Climbing out.|anna\n"
        + "wavs/link.wav|Linked out.|anna\n"
        + f"{outside}|Absolute.|anna\n"
        + "wavs/anna_1.wav|Again.|anna\n"
        + "wavs/ben_9.wav|   |ben\n"
    )
    write_audio(coqui / "wavs" / "ben_9.wav")
    items, problems = read_corpus(coqui)
    assert sorted(i.id for i in items) == [f"{s}_{n}" for s in ("anna", "ben") for n in range(3)]
    got = {(p.path, p.code) for p in problems}
    assert ("wavs/empty.wav", "empty_audio") in got
    assert ("../outside.wav", "outside_root") in got
    assert ("wavs/link.wav", "outside_root") in got
    assert (str(outside), "outside_root") in got
    assert ("wavs/anna_1.wav", "duplicate_id") in got
    assert ("wavs/ben_9.wav", "missing_transcript") in got
    assert all(p.severity == "error" for p in problems)


def test_metadata_linked_from_outside_is_not_read(tmp_path: Path):
    secret = tmp_path / "secret.csv"
    secret.write_text("audio_file|text|speaker_name\nroot:x:0:0|secret|x\n")
    root = tmp_path / "corpus"
    root.mkdir()
    (root / "metadata.csv").symlink_to(secret)
    items, problems = read_corpus(root, "coqui")
    assert items == []
    assert [p.code for p in problems] == ["outside_root"]
    assert "root:x" not in problems[0].message


def test_control_characters_are_cleaned(coqui: Path):
    meta = coqui / "metadata.csv"
    meta.write_bytes(
        b"audio_file|text|speaker_name\r\nwavs/anna_0.wav|Hi\x00 there\t again|anna\r\n"
    )
    items, problems = read_corpus(coqui)
    assert problems == [] and items[0].text == "Hi there again"


# ---------------------------------------------------------------------------------------------
# Audio checks


def item(text: str = "Hello there, friend.") -> CorpusItem:
    return CorpusItem("u1", Path("u1.wav"), text, "spk")


def test_clean_audio_has_no_problems():
    assert check_audio(item(), speechlike(2.0), SR, "en") == []


def test_check_audio_accepts_a_torch_tensor():
    import torch

    assert check_audio(item(), torch.from_numpy(speechlike(2.0)), SR, "en") == []


@pytest.mark.parametrize(
    "wav, original_sr, expected",
    [
        (speechlike(0.1), SR, [("too_short", "error")]),
        (speechlike(25.0), SR, [("too_long", "error")]),
        (np.zeros(SR * 2, dtype=np.float32), SR, [("mostly_silence", "error")]),
        (speechlike(2.0), 44100, [("resampled", "warning")]),
        (np.array([], dtype=np.float32), SR, [("empty_audio", "error")]),
        (np.full(SR, np.nan, dtype=np.float32), SR, [("undecodable", "error")]),
    ],
    ids=["short", "long", "silent", "resampled", "empty", "nan"],
)
def test_audio_problems(wav, original_sr, expected):
    problems = check_audio(item(), wav, original_sr, "en")
    assert [(p.code, p.severity) for p in problems] == expected
    assert all(p.message.startswith("u1.wav") for p in problems)


def test_a_blip_in_silence_is_mostly_silence():
    wav = np.zeros(SR * 5, dtype=np.float32)
    wav[SR : SR + SR // 4] = speechlike(0.25)
    problems = check_audio(item(), wav, SR, "en")
    assert [p.code for p in problems] == ["mostly_silence"]
    assert "%" in problems[0].message


def test_clipping_is_a_warning():
    wav = np.clip(speechlike(2.0) * 8, -1.0, 1.0)
    problems = check_audio(item(), wav, SR, "en")
    assert [(p.code, p.severity) for p in problems] == [("clipping", "warning")]


def test_unspeakable_characters():
    few = check_audio(item("Hello there, friend \U0001f600."), speechlike(2.0), SR, "en")
    assert [(p.code, p.severity) for p in few] == [("unspeakable_chars", "warning")]
    assert "\U0001f600" in few[0].message
    # Persian text through the English front-end: the transcript no longer matches the audio.
    wrong_language = check_audio(item("سلام، حال شما چطور است؟"), speechlike(2.0), SR, "en")
    assert [(p.code, p.severity) for p in wrong_language] == [("unspeakable_chars", "error")]
    assert "language" in wrong_language[0].message
    assert check_audio(item("سلام، حال شما چطور است؟"), speechlike(2.0), SR, "fa") == []


def test_corrupt_wav_becomes_an_undecodable_problem(coqui: Path):
    (coqui / "wavs" / "anna_2.wav").write_bytes(
        b"RIFF\x24\x00\x00\x00WAVEfmt garbage" + os.urandom(64)
    )
    items, problems = read_corpus(coqui)
    assert problems == []  # metadata is fine; decoding is where it fails
    broken = next(i for i in items if i.id == "anna_2")
    with pytest.raises(AudioError) as exc:
        load_audio(broken.audio_path)
    problem = undecodable(broken, str(exc.value))
    assert (problem.code, problem.severity, problem.item_id) == ("undecodable", "error", "anna_2")
    assert "anna_2.wav" in problem.message
    # The good files in the same corpus decode and pass.
    good = next(i for i in items if i.id == "anna_0")
    wav, original_sr = load_audio(good.audio_path)
    assert check_audio(good, wav, original_sr, "en") == []


def test_probe_audio_reads_headers_only(tmp_path: Path):
    from training.corpus import probe_audio

    def probe(path: Path):
        return probe_audio(CorpusItem(path.stem, path, "Hello.", "spk"))

    info, problems = probe(write_audio(tmp_path / "ok.flac", 1.5))
    assert problems == [] and info.sample_rate == SR and abs(info.duration_s - 1.5) < 1e-3
    info, problems = probe(write_audio(tmp_path / "cd.wav", 1.0, sr=44100))
    assert info.sample_rate == 44100 and [p.code for p in problems] == ["resampled"]
    assert [p.code for p in probe(write_audio(tmp_path / "s.wav", 0.1))[1]] == ["too_short"]
    header_only = tmp_path / "header.wav"
    sf.write(header_only, np.zeros(0, dtype=np.float32), SR)
    assert [(p.code, p.severity) for p in probe(header_only)[1]] == [("empty_audio", "error")]
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt garbage" + bytes(64))
    info, problems = probe(corrupt)
    assert info is None and [(p.code, p.severity) for p in problems] == [("undecodable", "error")]
    assert problems[0].message.startswith("corrupt.wav: cannot decode audio")
