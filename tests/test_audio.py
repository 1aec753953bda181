import math

import numpy as np
import pytest
import soundfile as sf
import torch

from training import audio as A

SR = 22050


def tone(freq, seconds=1.0, sr=SR, amp=0.5):
    t = torch.arange(int(seconds * sr)) / sr
    return amp * torch.sin(2 * math.pi * freq * t)


def voice_like(f0, seconds=1.0, sr=SR):
    """A harmonic tone with falling harmonics: periodic like a vowel, not a pure sine."""
    t = torch.arange(int(seconds * sr)) / sr
    return sum(0.4 / k * torch.sin(2 * math.pi * f0 * k * t + k) for k in range(1, 8))


# ---------------------------------------------------------------- loading


@pytest.mark.parametrize("fmt,subtype", [("WAV", "PCM_16"), ("FLAC", "PCM_24"), ("OGG", "VORBIS")])
def test_load_audio_decodes_formats_and_resamples(tmp_path, fmt, subtype):
    path = tmp_path / f"a.{fmt.lower()}"
    sf.write(path, tone(440, 0.5, sr=16000).numpy(), 16000, format=fmt, subtype=subtype)
    wav, original_sr = A.load_audio(path)
    assert original_sr == 16000
    assert wav.dtype == torch.float32 and wav.dim() == 1
    assert abs(wav.numel() - SR // 2) <= 2
    # Still a 440 Hz tone after resampling.
    f0 = A.pitch(wav, SR)
    assert torch.median(f0[f0 > 0]).item() == pytest.approx(440, rel=0.01)


def test_load_audio_mixes_stereo_down(tmp_path):
    left, right = tone(300, 0.3).numpy(), tone(500, 0.3, amp=0.2).numpy()
    sf.write(tmp_path / "s.wav", np.stack([left, right], axis=1), SR, subtype="FLOAT")
    wav, sr = A.load_audio(tmp_path / "s.wav")
    assert sr == SR and wav.shape == (len(left),)
    np.testing.assert_allclose(wav.numpy(), (left + right) / 2, atol=1e-6)


def test_load_audio_readable_errors(tmp_path):
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF....WAVEthis is not audio")
    with pytest.raises(A.AudioError, match=r"broken\.wav: cannot decode"):
        A.load_audio(bad)
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, dtype=np.float32), SR)
    with pytest.raises(A.AudioError, match="no audio samples"):
        A.load_audio(empty)
    with pytest.raises(A.AudioError, match="not found"):
        A.load_audio(tmp_path / "missing.flac")
    assert issubclass(A.AudioError, ValueError)


# ---------------------------------------------------------------- trim and loudness


def test_trim_silence_cuts_only_the_edges():
    sound = tone(200, 1.0)
    gap = torch.zeros(SR // 2)
    wav = torch.cat([torch.zeros(SR), sound, gap, sound, torch.zeros(SR)])
    out = A.trim_silence(wav, SR)
    # The middle gap stays; the edges go to within one analysis frame (~46 ms).
    assert 2.5 * SR <= out.numel() <= 2.5 * SR + 0.1 * SR
    silent = torch.zeros(SR)
    assert A.trim_silence(silent, SR).numel() == SR


def test_normalise_loudness_hits_target_without_clipping():
    quiet = tone(200, 1.0, amp=0.01)
    out = A.normalise_loudness(quiet, target_db=-23.0)
    rms_db = 20 * math.log10(out.pow(2).mean().sqrt().item())
    assert rms_db == pytest.approx(-23.0, abs=0.01)
    # A spiky signal is limited by its peak, never pushed past full scale.
    spiky = torch.zeros(SR)
    spiky[100] = 0.5
    assert A.normalise_loudness(spiky).abs().max() <= 0.99 + 1e-6
    assert torch.equal(A.normalise_loudness(torch.zeros(10)), torch.zeros(10))


# ---------------------------------------------------------------- features


@pytest.mark.parametrize("num", [1, 255, 256, 257, 22050, 33333])
def test_frames_agree_across_features(num):
    wav = torch.randn(num) * 0.1
    n = A.n_frames(num)
    mel = A.mel_spectrogram(wav)
    assert mel.shape == (80, n)
    assert A.pitch(wav, SR).shape == (n,)
    assert A.energy(wav).shape == (n,)
    m2, e2 = A.mel_and_energy(wav)
    assert torch.allclose(m2, mel) and torch.allclose(e2, A.energy(wav))


def test_mel_is_natural_log_with_floor():
    mel = A.mel_spectrogram(torch.zeros(SR))
    assert torch.allclose(mel, torch.full_like(mel, math.log(1e-5)))
    loud = A.mel_spectrogram(tone(1000, 0.5))
    # A 1 kHz tone puts its energy in the mel bands around 1 kHz, not at the top.
    band = loud.mean(dim=1).argmax().item()
    assert 10 < band < 40
    cpu = torch.device("cpu")
    assert A._mel_transform(A.DEFAULT, cpu) is A._mel_transform(A.DEFAULT, cpu)


@pytest.mark.parametrize("f0", [70, 110, 220, 440, 700])
def test_pitch_of_periodic_signals(f0):
    est = A.pitch(voice_like(f0), SR)
    inner = est[4:-4]
    assert (inner > 0).all()
    assert inner.median().item() == pytest.approx(f0, rel=0.01)


def test_pitch_tracks_a_sweep():
    t = torch.arange(2 * SR) / SR
    freq = 100 + 100 * t  # 100 -> 300 Hz
    wav = 0.5 * torch.sin(2 * math.pi * torch.cumsum(freq, 0) / SR)
    est = A.pitch(wav, SR)
    truth = 100 + 100 * (torch.arange(est.numel()) * 256 / SR)
    rel = ((est - truth).abs() / truth)[3:-3]
    assert rel.max() < 0.02


def test_pitch_unvoiced_for_noise_and_silence():
    torch.manual_seed(0)
    assert (A.pitch(torch.randn(SR) * 0.3, SR) > 0).float().mean() < 0.05
    assert A.pitch(torch.zeros(SR), SR).abs().sum() == 0
    # Voiced in the middle, unvoiced in the quiet parts around it.
    wav = torch.cat([torch.zeros(SR // 2), voice_like(150, 0.5), torch.zeros(SR // 2)])
    est = A.pitch(wav, SR)
    assert (est[:30] == 0).all() and (est[-30:] == 0).all()
    assert (est[50:80] > 0).all()


def test_energy_follows_level():
    wav = torch.cat([tone(300, 0.5, amp=0.1), tone(300, 0.5, amp=0.4)])
    en = A.energy(wav)
    first, second = en[5:35].mean(), en[-35:-5].mean()
    assert second / first == pytest.approx(4.0, rel=0.05)


def test_griffin_lim_reconstructs_a_tone():
    wav = voice_like(220, 1.0)
    out = A.griffin_lim(A.mel_spectrogram(wav), n_iter=16)
    assert out.dim() == 1 and abs(out.numel() - wav.numel()) <= 256
    assert out.abs().max() <= 0.95 + 1e-6
    f0 = A.pitch(out, SR)
    assert torch.median(f0[f0 > 0]).item() == pytest.approx(220, rel=0.03)
    batched = A.griffin_lim(torch.stack([A.mel_spectrogram(wav)] * 2), n_iter=4)
    assert batched.shape[0] == 2


def test_audio_config_round_trip():
    cfg = A.AudioConfig()
    assert (cfg.sample_rate, cfg.n_mels, cfg.n_fft, cfg.hop_length, cfg.win_length) == (
        22050,
        80,
        1024,
        256,
        1024,
    )
    assert A.AudioConfig.from_dict(cfg.to_dict()) == cfg


# ---------------------------------------------------------------- resampling at odd rates

ODD_RATE_SCRIPT = """
import resource, sys, torch
from training import audio as A
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
wav = torch.sin(torch.arange(3 * 48001) * 0.05)
out = A.resample(wav, 48001, 22050)
grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(out.numel(), grew * 1024, len(A._RESAMPLERS))
"""


def test_an_odd_sample_rate_resamples_in_bounded_memory():
    """3 s said to be at 48001 Hz: torchaudio's kernel for 48001 -> 22050 asked for 8.5 GB."""
    import subprocess
    import sys
    from pathlib import Path

    assert A.kernel_elements(48001, 22050) > A.MAX_KERNEL_ELEMENTS
    out = subprocess.run(
        [sys.executable, "-c", ODD_RATE_SCRIPT],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parent.parent,
    ).stdout.split()
    samples, grew, cached = int(out[0]), int(out[1]), int(out[2])
    assert abs(samples - 3 * 22050) <= 1
    assert grew < 64 * 1024**2, f"the process grew by {grew / 1024**2:.0f} MiB"
    assert cached == 0  # no kernel was built for the odd pair


def test_soxr_and_torchaudio_agree_on_a_tone():
    wav = tone(440, 1.0, sr=22051)
    odd = A.resample(wav, 22051, 22050)  # through soxr
    assert A.kernel_elements(22051, 22050) > A.MAX_KERNEL_ELEMENTS
    reference = tone(440, 1.0, sr=22050)
    n = min(len(odd), len(reference)) - 200
    assert torch.allclose(odd[100:n], reference[100:n], atol=0.02)
    # Channels first, like torchaudio: [..., time] in, [..., time] out.
    stereo = A.resample(torch.stack([wav, wav]), 22051, 22050)
    assert stereo.shape == (2, len(odd))


def test_the_resampler_cache_is_bounded():
    for rate in range(16000, 16000 + 40 * 50, 50):
        A.resample(torch.zeros(64), rate, 22050)
    assert len(A._RESAMPLERS) <= A.MAX_CACHED_RESAMPLERS
    with pytest.raises(A.AudioError):
        A.resample(torch.zeros(64), 0, 22050)
