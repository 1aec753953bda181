"""The datasets pages: upload, register, the dataset page and its parts, and who may see what.

Imports run synchronously here through the same service the Celery task calls; the real
worker is exercised in test_datasets_tasks.py.
"""

from __future__ import annotations

import csv
import io
import zipfile
from pathlib import Path

import pytest
from test_corpus import write_audio

from studio.datasets import importing, reports
from studio.models import Dataset

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def private_media(settings, tmp_path: Path):
    settings.STUDIO_DATASETS_DIR = tmp_path / "media" / "datasets"
    settings.STUDIO_DATASET_ROOTS = [tmp_path / "imports"]
    (tmp_path / "imports").mkdir()
    return tmp_path


def make_corpus(root: Path, speakers=("anna", "ben"), per_speaker: int = 3) -> Path:
    lines = ["audio_file|text|speaker_name"]
    for spk in speakers:
        for n in range(per_speaker):
            write_audio(root / "wavs" / f"{spk}_{n}.wav", 0.8 + 0.2 * n)
            lines.append(f"wavs/{spk}_{n}.wav|Sentence {n} spoken by {spk}.|{spk}")
    lines.append("wavs/missing.wav|This file is not there.|anna")
    (root / "metadata.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def zip_folder(folder: Path, extra: dict[str, bytes] | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, f"corpus/{path.relative_to(folder).as_posix()}")
        for name, data in (extra or {}).items():
            zf.writestr(zipfile.ZipInfo(name), data)
    return buffer.getvalue()


def upload(client, data: bytes, name: str = "corpus.zip", **fields):
    from django.core.files.uploadedfile import SimpleUploadedFile

    post = {"name": "My voice", "format": "auto", "language": "en"} | fields
    post["archive"] = SimpleUploadedFile(name, data, content_type="application/zip")
    return client.post("/datasets/upload/", post)


@pytest.fixture
def imported(user, private_media) -> Dataset:
    folder = make_corpus(private_media / "imports" / "voice")
    dataset = Dataset.objects.create(
        owner=user, name="Voice", source=Dataset.Source.FOLDER, source_path=str(folder)
    )
    importing.import_dataset(dataset.pk)
    dataset.refresh_from_db()
    return dataset


# --------------------------------------------------------------------------- who sees what


def test_anonymous_is_sent_to_sign_in(client, imported):
    for url in (
        "/datasets/",
        f"/datasets/{imported.pk}/",
        f"/datasets/{imported.pk}/progress.json",
    ):
        response = client.get(url)
        assert response.status_code == 302 and "/login/" in response["Location"]


def test_others_get_404_everywhere_and_staff_see_all(client, imported, other_user, staff_user):
    utterance = imported.utterances.filter(usable=True).first()
    urls = [
        f"/datasets/{imported.pk}/",
        f"/datasets/{imported.pk}/progress.json",
        f"/datasets/{imported.pk}/problems.csv",
        f"/datasets/{imported.pk}/durations.png",
        f"/datasets/{imported.pk}/utterances/{utterance.pk}/audio",
        f"/datasets/{imported.pk}/utterances/{utterance.pk}/mel.png",
    ]
    client.force_login(other_user)
    assert b"Voice" not in client.get("/datasets/").content
    for url in urls:
        assert client.get(url).status_code == 404, url
    for url in (f"/datasets/{imported.pk}/retry/", f"/datasets/{imported.pk}/delete/"):
        assert client.post(url).status_code == 404
    assert Dataset.objects.filter(pk=imported.pk).exists()
    client.force_login(staff_user)
    assert b"Voice" in client.get("/datasets/").content
    for url in urls:
        assert client.get(url).status_code == 200, url


def test_an_utterance_of_another_dataset_is_404(client_user, imported, other_user):
    theirs = Dataset.objects.create(owner=other_user, name="theirs")
    foreign = theirs.utterances.create(item_id="x", audio_path=str(imported.source_path))
    response = client_user.get(f"/datasets/{imported.pk}/utterances/{foreign.pk}/audio")
    assert response.status_code == 404


# --------------------------------------------------------------------------- upload


def test_upload_creates_a_dataset_and_queues_the_import(
    client_user, user, private_media, django_capture_on_commit_callbacks
):
    archive = zip_folder(make_corpus(private_media / "src"))
    with django_capture_on_commit_callbacks() as callbacks:
        response = upload(client_user, archive)
    dataset = Dataset.objects.get(owner=user)
    assert response.status_code == 302 and response["Location"] == f"/datasets/{dataset.pk}/"
    assert dataset.source == Dataset.Source.UPLOAD and dataset.status == Dataset.Status.NEW
    assert Path(dataset.source_path).read_bytes() == archive
    assert len(callbacks) == 1  # the Celery task, sent once the row is committed
    # What the task does, run here: unpack, read, check.
    importing.import_dataset(dataset.pk)
    dataset.refresh_from_db()
    assert dataset.status == Dataset.Status.IMPORTED
    assert dataset.n_utterances == 6 and dataset.n_speakers == 2
    assert not Path(dataset.source_path).exists()  # the archive is gone once unpacked


@pytest.mark.parametrize(
    "name, data, message",
    [
        ("notes.txt", b"hello", "is not an archive this studio reads"),
        ("corpus.zip", b"", "The submitted file is empty"),
    ],
)
def test_upload_mistakes_are_form_errors(client_user, name, data, message):
    response = upload(client_user, data, name=name)
    assert response.status_code == 400
    assert message in response.content.decode()
    assert not Dataset.objects.exists()


def test_upload_without_a_name_or_file(client_user):
    response = client_user.post("/datasets/upload/", {"format": "auto", "language": "en"})
    assert response.status_code == 400
    assert response.content.decode().count("This field is required") == 2


def test_upload_over_the_limit_is_refused_before_it_is_stored(client_user, settings):
    settings.STUDIO_MAX_UPLOAD_BYTES = 100_000
    response = upload(client_user, b"0" * 300_000)
    assert response.status_code == 413
    assert "larger than the limit of 97.7" in response.content.decode()
    assert not Dataset.objects.exists()


def test_upload_form_keeps_csrf(client, user):
    from django.test import Client

    strict = Client(enforce_csrf_checks=True)
    strict.force_login(user)
    response = upload(strict, b"PK\x05\x06" + bytes(18))
    assert response.status_code == 403
    assert not Dataset.objects.exists()


def test_hostile_archive_keeps_good_files_and_lists_the_rest(client_user, user, private_media):
    archive = zip_folder(
        make_corpus(private_media / "src"),
        {"../escape.txt": b"x", "/etc/cron.d/evil": b"x", "corpus/wavs/zero.wav": b""},
    )
    upload(client_user, archive)
    dataset = Dataset.objects.get(owner=user)
    importing.import_dataset(dataset.pk)
    dataset.refresh_from_db()
    assert dataset.status == Dataset.Status.IMPORTED and dataset.n_utterances == 6
    assert not (private_media / "media" / "datasets" / "escape.txt").exists()
    page = client_user.get(f"/datasets/{dataset.pk}/").content.decode()
    assert "archive_skipped" in page and "missing_file" in page
    response = client_user.get(f"/datasets/{dataset.pk}/problems.csv")
    rows = list(csv.reader(io.StringIO(response.content.decode())))
    messages = " ".join(r[-1] for r in rows)
    assert "climbs out of the folder" in messages and "absolute path" in messages


def test_zip_bomb_fails_with_a_clear_message(client_user, user):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("corpus/metadata.csv", "audio_file|text|speaker_name\n")
        zf.writestr("corpus/wavs/bomb.wav", bytes(64 * 1024 * 1024))
    upload(client_user, buffer.getvalue())
    dataset = Dataset.objects.get(owner=user)
    importing.import_dataset(dataset.pk)
    dataset.refresh_from_db()
    assert dataset.status == Dataset.Status.FAILED
    assert "zip bomb" in dataset.status_message
    page = client_user.get(f"/datasets/{dataset.pk}/")
    assert page.status_code == 200 and "zip bomb" in page.content.decode()
    assert not importing.raw_dir(dataset).exists()


# --------------------------------------------------------------------------- register a folder


def test_register_folder_inside_the_roots(client_user, user, private_media):
    make_corpus(private_media / "imports" / "mine")
    response = client_user.post(
        "/datasets/register/", {"name": "Mine", "path": "mine", "format": "auto", "language": "en"}
    )
    dataset = Dataset.objects.get(owner=user)
    assert response.status_code == 302
    assert dataset.source_path == str((private_media / "imports" / "mine").resolve())


@pytest.mark.parametrize(
    "path, message",
    [
        ("/etc", "outside the folders this server allows"),
        ("../", "outside the folders this server allows"),
        ("nope", "does not exist"),
        ("empty", "could not recognise a corpus"),
        ("", "This field is required"),
    ],
)
def test_register_folder_mistakes(client_user, private_media, path, message):
    (private_media / "imports" / "empty").mkdir()
    response = client_user.post(
        "/datasets/register/", {"name": "x", "path": path, "format": "auto", "language": "en"}
    )
    assert response.status_code == 400
    assert message in response.content.decode()
    assert not Dataset.objects.exists()


def test_register_refuses_a_link_out_of_the_roots(client_user, private_media):
    make_corpus(private_media / "elsewhere")
    (private_media / "imports" / "link").symlink_to(private_media / "elsewhere")
    response = client_user.post(
        "/datasets/register/", {"name": "x", "path": "link", "format": "auto", "language": "en"}
    )
    assert response.status_code == 400 and "outside the folders" in response.content.decode()


def test_bad_choices_are_form_errors(client_user, private_media):
    make_corpus(private_media / "imports" / "mine")
    response = client_user.post(
        "/datasets/register/", {"name": "x", "path": "mine", "format": "mp3", "language": "xx"}
    )
    assert response.status_code == 400
    assert response.content.decode().count("Select a valid choice") == 2


def test_get_on_post_only_urls_is_not_an_error(client_user, imported):
    assert client_user.get("/datasets/upload/").status_code == 302
    assert client_user.get("/datasets/register/").status_code == 405
    assert client_user.get(f"/datasets/{imported.pk}/retry/").status_code == 405
    assert client_user.get("/datasets/999999/").status_code == 404


# --------------------------------------------------------------------------- the dataset page


def test_new_page_offers_both_sources(client_user, private_media):
    page = client_user.get("/datasets/new/").content.decode()
    assert 'action="/datasets/upload/"' in page and 'action="/datasets/register/"' in page
    assert str(private_media / "imports") in page


def test_dataset_page_shows_totals_speakers_problems_and_examples(client_user, imported):
    response = client_user.get(f"/datasets/{imported.pk}/")
    page = response.content.decode()
    assert response.status_code == 200
    assert 'id="stat-utterances">6<' in page and 'id="stat-speakers">2<' in page
    assert "anna" in page and "ben" in page
    assert "missing_file" in page and "1 not used" in page
    assert page.count("<audio") == 4  # one per speaker first, then more to make four
    assert "Sentence 0 spoken by anna." in page
    assert "/durations.png" in page and "/mel.png" in page


def test_problems_csv_lists_every_problem(client_user, imported):
    response = client_user.get(f"/datasets/{imported.pk}/problems.csv")
    assert response["Content-Type"].startswith("text/csv")
    assert "attachment" in response["Content-Disposition"]
    rows = list(csv.reader(io.StringIO(response.content.decode())))
    # verdict and reason: the quality gate's, filled for the clips it judged.
    header = ["item_id", "speaker", "file", "code", "severity", "kept", "verdict", "reason"]
    assert rows[0] == [*header, "message"]
    assert [r[3] for r in rows[1:]] == ["missing_file"]
    assert rows[1][5] == "no" and "does not exist" in rows[1][-1]


def test_csv_cells_cannot_become_spreadsheet_formulas():
    assert reports.csv_line(["=HYPERLINK(1)", "ok"]).startswith("'=HYPERLINK")


def test_pictures_and_audio(client_user, imported):
    histogram = client_user.get(f"/datasets/{imported.pk}/durations.png")
    assert histogram["Content-Type"] == "image/png" and histogram.content[:4] == b"\x89PNG"
    utterance = imported.utterances.filter(usable=True).first()
    audio = client_user.get(f"/datasets/{imported.pk}/utterances/{utterance.pk}/audio")
    assert audio["Content-Type"] == "audio/x-wav" or audio["Content-Type"] == "audio/wav"
    assert b"".join(audio.streaming_content)[:4] == b"RIFF"
    mel = client_user.get(f"/datasets/{imported.pk}/utterances/{utterance.pk}/mel.png")
    assert mel.content[:4] == b"\x89PNG"


def test_mel_of_a_broken_file_is_404_not_500(client_user, imported):
    utterance = imported.utterances.filter(usable=True).first()
    Path(utterance.audio_path).write_bytes(b"RIFF garbage")
    response = client_user.get(f"/datasets/{imported.pk}/utterances/{utterance.pk}/mel.png")
    assert response.status_code == 404


def test_progress_json(client_user, imported):
    imported.set_progress(0.25, 42.0, "Preprocessing: 2 of 8 files")
    Dataset.objects.filter(pk=imported.pk).update(status=Dataset.Status.PREPROCESSING)
    data = client_user.get(f"/datasets/{imported.pk}/progress.json").json()
    assert data["status"] == "preprocessing" and data["busy"] is True
    assert data["progress"] == 0.25 and data["eta_seconds"] == 42
    assert data["message"] == "Preprocessing: 2 of 8 files"
    assert data["utterances"] == 6 and data["stale"] is False
    page = client_user.get(f"/datasets/{imported.pk}/").content.decode()
    assert 'data-busy="1"' in page and "25%" in page


def test_retry_a_failed_import_and_delete(
    client_user, imported, django_capture_on_commit_callbacks
):
    Dataset.objects.filter(pk=imported.pk).update(status=Dataset.Status.FAILED)
    with django_capture_on_commit_callbacks() as callbacks:
        response = client_user.post(f"/datasets/{imported.pk}/retry/")
    assert response.status_code == 302 and len(callbacks) == 1
    imported.refresh_from_db()
    assert imported.status == Dataset.Status.NEW
    response = client_user.post(f"/datasets/{imported.pk}/delete/")
    assert response.status_code == 302 and response["Location"] == "/datasets/"
    assert not Dataset.objects.filter(pk=imported.pk).exists()
    # The registered folder itself is never touched.
    assert Path(imported.source_path, "metadata.csv").is_file()


def test_list_page(client_user, imported):
    page = client_user.get("/datasets/").content.decode()
    assert "Voice" in page and "Imported" in page


# --------------------------------------------------------------------------- hostile files


def test_a_page_named_by_the_metadata_is_never_served(client_user, user, private_media):
    """Stored XSS, as reported: a Coqui CSV row naming page.html (a script inside) imported as an
    unusable row, and its audio URL answered 200 text/html, inline."""
    folder = make_corpus(private_media / "imports" / "xss", speakers=("anna",), per_speaker=1)
    (folder / "wavs" / "page.html").write_text("<script>alert(document.cookie)</script>")
    with open(folder / "metadata.csv", "a", encoding="utf-8") as f:
        f.write("wavs/page.html|A page, not a voice.|anna\n")
    dataset = Dataset.objects.create(
        owner=user, name="xss", source=Dataset.Source.FOLDER, source_path=str(folder)
    )
    importing.import_dataset(dataset.pk)
    row = dataset.utterances.get(audio_path__endswith="page.html")
    assert row.usable is False
    for what in ("audio", "mel.png"):
        response = client_user.get(f"/datasets/{dataset.pk}/utterances/{row.pk}/{what}")
        assert response.status_code == 404
        assert b"<script>" not in response.content

    # A usable row whose file is swapped for a page after the import: not audio, not served.
    good = dataset.utterances.filter(usable=True).first()
    Path(good.audio_path).write_text("<script>alert(1)</script>")
    response = client_user.get(f"/datasets/{dataset.pk}/utterances/{good.pk}/audio")
    assert response.status_code == 404


def test_audio_is_served_as_an_audio_attachment_and_nothing_else(client_user, imported):
    utterance = imported.utterances.filter(usable=True).first()
    response = client_user.get(f"/datasets/{imported.pk}/utterances/{utterance.pk}/audio")
    assert response.status_code == 200
    assert response["Content-Type"] == "audio/wav"
    assert response["X-Content-Type-Options"] == "nosniff"
    assert response["Content-Disposition"] == f'attachment; filename="utterance-{utterance.pk}.wav"'
    assert "sandbox" in response["Content-Security-Policy"]
    assert b"".join(response.streaming_content)[:4] == b"RIFF"


def test_audio_outside_the_dataset_folder_is_not_served(client_user, imported, private_media):
    """A row pointing elsewhere (edited, or a link swapped in) leaks nothing, even real audio."""
    outside = private_media / "secret.wav"
    write_audio(outside, 1.0)
    utterance = imported.utterances.filter(usable=True).first()
    utterance.audio_path = str(outside)
    utterance.save()
    response = client_user.get(f"/datasets/{imported.pk}/utterances/{utterance.pk}/audio")
    assert response.status_code == 404
    # A link inside the corpus that leads out of it is found at import and never opened.
    folder = make_corpus(private_media / "imports" / "linked", speakers=("anna",), per_speaker=1)
    (folder / "wavs" / "out.wav").symlink_to(outside)
    with open(folder / "metadata.csv", "a", encoding="utf-8") as f:
        f.write("wavs/out.wav|Somebody else's voice.|anna\n")
    dataset = Dataset.objects.create(
        owner=imported.owner, name="linked", source=Dataset.Source.FOLDER, source_path=str(folder)
    )
    importing.import_dataset(dataset.pk)
    assert not dataset.utterances.filter(usable=True, audio_path__endswith="out.wav").exists()


def test_problems_csv_neutralises_formulas_and_hides_server_paths(client_user, user, private_media):
    folder = make_corpus(private_media / "imports" / "csv", speakers=("anna",), per_speaker=1)
    (folder / "wavs" / "bad.wav").write_bytes(b"RIFF not audio")
    with open(folder / "metadata.csv", "a", encoding="utf-8") as f:
        f.write("wavs/bad.wav|=HYPERLINK(1)|anna\n")
    dataset = Dataset.objects.create(
        owner=user, name="csv", source=Dataset.Source.FOLDER, source_path=str(folder)
    )
    importing.import_dataset(dataset.pk)
    body = client_user.get(f"/datasets/{dataset.pk}/problems.csv").content.decode()
    assert str(private_media) not in body
    rows = list(csv.reader(io.StringIO(body)))
    assert "wavs/bad.wav" in {r[2] for r in rows[1:]}  # as the person knows it
    for cell in ("\tx", "\rx", "=x", "+x", "-x", "@x"):
        assert reports.csv_line([cell]).lstrip('"').startswith("'")


def test_a_huge_metadata_file_fails_the_import_with_a_message(user, private_media, monkeypatch):
    import training.corpus

    monkeypatch.setattr(training.corpus, "MAX_METADATA_BYTES", 1024)
    folder = make_corpus(private_media / "imports" / "big", speakers=("anna",), per_speaker=1)
    with open(folder / "metadata.csv", "a", encoding="utf-8") as f:
        f.write("x|" + "y" * 2000 + "|anna\n")
    dataset = Dataset.objects.create(
        owner=user, name="big", source=Dataset.Source.FOLDER, source_path=str(folder)
    )
    importing.import_dataset(dataset.pk)
    dataset.refresh_from_db()
    assert dataset.status == Dataset.Status.FAILED
    assert "metadata.csv is larger than 1 KB" in dataset.status_message


def test_register_never_tells_what_exists_outside_the_roots(client_user, private_media):
    answers = []
    for path in ("/etc", "/etc/no-such-folder-here"):
        response = client_user.post(
            "/datasets/register/", {"name": "x", "path": path, "format": "auto", "language": "en"}
        )
        assert response.status_code == 400
        answers.append("outside the folders this server allows" in response.content.decode())
    assert answers == [True, True]


def test_a_registered_folder_swapped_for_a_link_out_fails_at_import(user, private_media):
    folder = make_corpus(private_media / "imports" / "swap")
    dataset = Dataset.objects.create(
        owner=user, name="swap", source=Dataset.Source.FOLDER, source_path=str(folder)
    )
    make_corpus(private_media / "elsewhere")
    folder.rename(private_media / "imports" / "swap-old")
    folder.symlink_to(private_media / "elsewhere")
    importing.import_dataset(dataset.pk)
    dataset.refresh_from_db()
    assert dataset.status == Dataset.Status.FAILED
    assert "outside the folders" in dataset.status_message
    assert not dataset.utterances.exists()


def test_a_queued_dataset_reports_itself_busy(
    client_user, private_media, django_capture_on_commit_callbacks
):
    """Between the upload and a worker taking the import, the page must keep polling."""
    data = zip_folder(make_corpus(private_media / "voice"))
    with django_capture_on_commit_callbacks(execute=False):
        response = upload(client_user, data)
    dataset = Dataset.objects.get()
    assert response.status_code == 302 and dataset.status == Dataset.Status.NEW
    progress = client_user.get(f"/datasets/{dataset.pk}/progress.json").json()
    assert progress["status"] == "new" and progress["busy"] is True
    assert progress["stale"] is False  # waiting in the queue is not a lost worker
    page = client_user.get(f"/datasets/{dataset.pk}/").content.decode()
    assert 'data-busy="1"' in page
    # The worker takes the import: no longer queued, and once imported no longer busy.
    importing.import_dataset(dataset.pk)
    progress = client_user.get(f"/datasets/{dataset.pk}/progress.json").json()
    assert progress["status"] == "imported" and progress["busy"] is False
