"""Forms of the datasets area: upload an archive, or register a folder on the server."""

from __future__ import annotations

from pathlib import Path

from django import forms
from django.conf import settings
from django.template.defaultfilters import filesizeformat

from studio.datasets.archives import FolderRefused, resolve_server_folder
from studio.datasets.importing import ARCHIVE_SUFFIXES
from studio.models import Dataset
from training.corpus import detect_format


class DatasetFields(forms.Form):
    name = forms.CharField(max_length=200)
    format = forms.ChoiceField(
        choices=Dataset.Format.choices,
        initial=Dataset.Format.AUTO,
        help_text="Leave on “detect” unless the guess is wrong.",
    )
    language = forms.ChoiceField(
        choices=Dataset.Language.choices,
        initial=Dataset.Language.ENGLISH,
        help_text="Decides the text front-end and which characters it can speak.",
    )


class UploadDatasetForm(DatasetFields):
    archive = forms.FileField(
        help_text="A .zip or .tar.gz of the corpus folder (LJSpeech, VCTK, Coqui CSV or "
        "Common Voice TSV layout)."
    )

    field_order = ["name", "archive", "format", "language"]

    def __init__(self, *args, **kwargs):
        # Both forms share one page; distinct ids keep their labels pointing at their inputs.
        kwargs.setdefault("auto_id", "upload_%s")
        super().__init__(*args, **kwargs)

    def clean_archive(self):
        archive = self.cleaned_data["archive"]
        lowered = archive.name.lower()
        if not lowered.endswith(ARCHIVE_SUFFIXES):
            raise forms.ValidationError(
                f"“{archive.name}” is not an archive this studio reads; "
                "upload a .zip or .tar.gz (also .tgz, .tar, .tar.bz2, .tar.xz)."
            )
        limit = settings.STUDIO_MAX_UPLOAD_BYTES
        if archive.size > limit:
            raise forms.ValidationError(
                f"The archive is {filesizeformat(archive.size)}; the limit is "
                f"{filesizeformat(limit)}. Register the folder on the server instead."
            )
        return archive


class RegisterFolderForm(DatasetFields):
    path = forms.CharField(
        max_length=1000,
        label="Folder on the server",
        help_text="An absolute path, or a path relative to an allowed folder.",
    )

    field_order = ["name", "path", "format", "language"]

    def __init__(self, *args, roots=None, **kwargs):
        kwargs.setdefault("auto_id", "folder_%s")
        super().__init__(*args, **kwargs)
        self.roots = [Path(r) for r in (settings.STUDIO_DATASET_ROOTS if roots is None else roots)]

    def clean_path(self) -> Path:
        try:
            return resolve_server_folder(self.cleaned_data["path"], self.roots)
        except FolderRefused as exc:
            raise forms.ValidationError(str(exc)) from exc

    def clean(self):
        cleaned = super().clean()
        folder = cleaned.get("path")
        # Detection reads a line or two of metadata: cheap enough to say "wrong folder" now
        # instead of after a trip through the queue.
        if folder is not None and cleaned.get("format") == Dataset.Format.AUTO:
            try:
                detect_format(folder)
            except ValueError as exc:
                self.add_error("path", str(exc))
        return cleaned


class HeldOutSpeakersForm(forms.Form):
    """Which speakers of a dataset stay out of training, to be scored as voices never heard.

    Cloning them needs 3 clips for the reference and at least one other clip to compare the
    output with, and training needs at least one speaker left.
    """

    MIN_CLIPS = 4

    held_out = forms.ModelMultipleChoiceField(
        queryset=None,
        required=False,
        widget=forms.CheckboxSelectMultiple,
        label="Held-out speakers",
    )

    def __init__(self, dataset: Dataset, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.dataset = dataset
        speakers = dataset.speakers.filter(n_utterances__gt=0).order_by("name")
        self.fields["held_out"].queryset = speakers
        self.fields["held_out"].label_from_instance = lambda s: f"{s.name} ({s.n_utterances})"
        self.fields["held_out"].initial = [s.pk for s in speakers if s.held_out]

    def clean_held_out(self):
        chosen = list(self.cleaned_data["held_out"])
        total = self.fields["held_out"].queryset.count()
        if chosen and len(chosen) >= total:
            raise forms.ValidationError(
                "Keep at least one speaker for training: every speaker is marked held out."
            )
        few = [s.name for s in chosen if s.n_utterances < self.MIN_CLIPS]
        if few:
            raise forms.ValidationError(
                f"{', '.join(few)}: a held-out speaker needs at least {self.MIN_CLIPS} usable "
                "clips (3 to clone the voice from, and others to compare the output with)."
            )
        return chosen

    def save(self) -> list[str]:
        """Store the choice on the Speaker rows; the names held out, sorted."""
        chosen = {s.pk for s in self.cleaned_data["held_out"]}
        speakers = self.dataset.speakers.all()
        speakers.filter(pk__in=chosen).update(held_out=True)
        speakers.exclude(pk__in=chosen).update(held_out=False)
        return sorted(speakers.filter(held_out=True).values_list("name", flat=True))
