"""What each hostile dataset gets: final status, message, and the peak memory of the process
that imported (and preprocessed) it, each in a fresh process as a cpu worker would run it.

    python bench/hostile_inputs.py            # every case, one JSON line each
    python bench/hostile_inputs.py pax_header # one case

The archives are built here: a PAX header and a GNU long name of 1 GiB (about 1 MB gzipped),
100,001 members each behind a PAX header (200,002 headers), a GNU sparse member, a zip bomb,
a zip with `../` and absolute names, a Coqui CSV naming an HTML page, and a clip that says
48001 Hz.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import resource
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

CASES = [
    "pax_header",
    "gnu_longname",
    "many_pax_headers",
    "sparse",
    "zip_bomb",
    "zip_slip",
    "html_row",
    "rate_48001",
]


def wav_bytes(seconds: float = 1.0, sr: int = 22050) -> bytes:
    import numpy as np
    import soundfile as sf

    t = np.arange(int(seconds * sr)) / sr
    buffer = io.BytesIO()
    sf.write(buffer, (0.3 * np.sin(2 * np.pi * 220 * t)).astype("float32"), sr, format="WAV")
    return buffer.getvalue()


def corpus_members(n: int = 3) -> dict[str, bytes]:
    lines = ["audio_file|text|speaker_name"]
    members = {}
    for i in range(n):
        members[f"corpus/wavs/a{i}.wav"] = wav_bytes(1.0 + 0.2 * i)
        lines.append(f"wavs/a{i}.wav|Sentence number {i}.|anna")
    members["corpus/metadata.csv"] = ("\n".join(lines) + "\n").encode()
    return members


def add(tf: tarfile.TarFile, name: str, data: bytes, **pax) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    if pax:
        info.pax_headers = pax
    tf.addfile(info, io.BytesIO(data))


def build(case: str, folder: Path) -> Path:
    good = corpus_members()
    if case in ("pax_header", "gnu_longname"):
        path = folder / f"{case}.tar.gz"
        header = tarfile.TarInfo("././@LongHeader")
        header.type = tarfile.XHDTYPE if case == "pax_header" else tarfile.GNUTYPE_LONGNAME
        header.size = 1024**3
        with gzip.open(path, "wb", compresslevel=1) as gz:
            gz.write(header.tobuf(tarfile.USTAR_FORMAT))
            zeros = bytes(1024**2)
            for _ in range(1024):
                gz.write(zeros)
            with tarfile.open(fileobj=gz, mode="w", format=tarfile.USTAR_FORMAT) as tf:
                for name, data in good.items():
                    add(tf, name, data)
        return path
    if case == "many_pax_headers":
        path = folder / f"{case}.tar.gz"
        with tarfile.open(path, "w:gz", format=tarfile.PAX_FORMAT, compresslevel=1) as tf:
            for name, data in good.items():
                add(tf, name, data)
            for n in range(100_001):
                add(tf, f"corpus/junk/{n}.txt", b"", comment="x")
        return path
    if case == "sparse":
        path = folder / f"{case}.tar"
        with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
            for name, data in good.items():
                add(tf, name, data)
        info = tarfile.TarInfo("corpus/holes.wav")
        info.type = tarfile.GNUTYPE_SPARSE
        raw = path.read_bytes().rstrip(b"\0")
        raw += b"\0" * (-len(raw) % 512)
        path.write_bytes(raw + info.tobuf(tarfile.GNU_FORMAT) + bytes(1024))
        return path
    if case == "zip_bomb":
        path = folder / f"{case}.zip"
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, data in good.items():
                zf.writestr(name, data)
            zf.writestr("corpus/wavs/silence.wav", bytes(2 * 1024**3 - 1))
        return path
    if case == "zip_slip":
        path = folder / f"{case}.zip"
        with zipfile.ZipFile(path, "w") as zf:
            for name, data in good.items():
                zf.writestr(zipfile.ZipInfo(name), data)
            zf.writestr(zipfile.ZipInfo("../../evil.txt"), b"x")
            zf.writestr(zipfile.ZipInfo("/tmp/evil.txt"), b"x")
        return path
    if case in ("html_row", "rate_48001"):
        path = folder / f"{case}.zip"
        members = dict(good)
        lines = members["corpus/metadata.csv"].decode()
        if case == "html_row":
            members["corpus/wavs/page.html"] = b"<script>alert(document.cookie)</script>"
            lines += "wavs/page.html|A page, not a voice.|anna\n"
        else:
            members["corpus/wavs/odd.wav"] = wav_bytes(3.0, 48001)
            lines += "wavs/odd.wav|Three seconds at an odd rate.|anna\n"
        members["corpus/metadata.csv"] = lines.encode()
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, data in members.items():
                zf.writestr(name, data)
        return path
    raise SystemExit(f"unknown case {case}")


def run_case(case: str) -> dict:
    """In this (fresh) process: upload, import, preprocess, as the cpu worker would."""
    import django

    django.setup()
    import torch  # noqa: F401 (preprocessing imports it; not the dataset's memory)
    from django.contrib.auth import get_user_model
    from django.core.files.uploadedfile import SimpleUploadedFile
    from django.core.management import call_command
    from django.test import Client

    from studio.datasets import importing
    from studio.models import Dataset

    call_command("migrate", verbosity=0)
    owner = get_user_model().objects.create_user("bench", password="bench-pass-123")
    archive = build(case, Path(tempfile.mkdtemp(prefix="hostile-")))
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with open(archive, "rb") as f:
        upload = SimpleUploadedFile(archive.name, f.read())
    dataset = importing.create_from_upload(owner, case, upload, "auto", "en")
    del upload
    baseline = max(baseline, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    importing.import_dataset(dataset.pk)
    dataset.refresh_from_db()
    if dataset.status == Dataset.Status.IMPORTED:
        importing.preprocess_dataset(dataset.pk, workers=1)
        dataset.refresh_from_db()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = {
        "bench": "hostile_inputs",
        "case": case,
        "archive_mb": round(archive.stat().st_size / 1024**2, 2),
        "status": dataset.status,
        "message": dataset.status_message[:300],
        "usable": dataset.utterances.filter(usable=True).count(),
        "peak_growth_mb": round((peak - baseline) / 1024, 1),
    }
    if case == "html_row":
        web = Client(HTTP_HOST="localhost")
        web.force_login(owner)
        row = dataset.utterances.get(item_id__contains="page")
        response = web.get(f"/datasets/{dataset.pk}/utterances/{row.pk}/audio")
        result["page_row_audio_answer"] = response.status_code
        result["page_row_usable"] = row.usable
    return result


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--one"]:
        print(json.dumps(run_case(argv[1])), flush=True)
        return 0
    redis_proc = None
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "studio.settings")
    from metrics_latency import setup_environment

    for case in argv or CASES:
        redis_proc = redis_proc or setup_environment()
        os.environ["STUDIO_DATA_DIR"] = tempfile.mkdtemp(prefix="bench-hostile-")
        out = subprocess.run(
            [sys.executable, __file__, "--one", case], capture_output=True, text=True, cwd=ROOT
        )
        lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
        if out.returncode or not lines:
            print(
                json.dumps(
                    {
                        "bench": "hostile_inputs",
                        "case": case,
                        "crashed": out.returncode,
                        "stderr": out.stderr[-1500:],
                    }
                ),
                flush=True,
            )
        else:
            print(lines[-1], flush=True)
    if redis_proc is not None:
        redis_proc.terminate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
