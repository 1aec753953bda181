"""What the studio stores: datasets, configs, runs and everything a run produces.

Fat models: behaviour that belongs to a row (who may see it, state changes of a run, turning
a stored config into a training config) lives here, so views and tasks stay thin.
"""

from __future__ import annotations

import math
import secrets
import uuid
from datetime import datetime
from pathlib import Path

from celery import current_app
from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models, transaction
from django.db.models.functions import Now
from django.urls import reverse
from django.utils import timezone

from studio import workers
from training.config import (
    BATCH_RANGES,
    SAFE_RANGE_REASONS,
    SAFE_RANGES,
    TrainConfig,
    UnsafeConfig,
    batch_warning,
    check_safe,
    preset,
    range_text,
)


class Timestamped(models.Model):
    created = models.DateTimeField(default=timezone.now, db_index=True)
    updated = models.DateTimeField(auto_now=True)

    class Meta:
        abstract = True


class OwnedQuerySet(models.QuerySet):
    """Every model a person owns, directly or through its dataset or run, is read through
    `visible_to`, so "who may see this" has one answer (each model names its `owner_lookup`)."""

    def visible_to(self, user):
        """Staff see everything; everyone else sees only what they own."""
        if not user.is_authenticated:
            return self.none()
        if user.is_staff:
            return self
        return self.filter(**{self.model.owner_lookup: user})


class Owned(Timestamped):
    owner_lookup = "owner"

    objects = OwnedQuerySet.as_manager()

    class Meta:
        abstract = True

    def is_visible_to(self, user) -> bool:
        return type(self).objects.visible_to(user).filter(pk=self.pk).exists()


# --------------------------------------------------------------------------- datasets


class Dataset(Owned):
    class Status(models.TextChoices):
        NEW = "new", "New"
        IMPORTING = "importing", "Importing"
        IMPORTED = "imported", "Imported"
        PREPROCESSING = "preprocessing", "Preprocessing"
        READY = "ready", "Ready"
        FAILED = "failed", "Failed"

    class Source(models.TextChoices):
        UPLOAD = "upload", "Uploaded archive"
        FOLDER = "folder", "Folder on the server"

    class Format(models.TextChoices):
        AUTO = "auto", "Detect automatically"
        LJSPEECH = "ljspeech", "LJSpeech (metadata.csv + wavs/)"
        VCTK = "vctk", "VCTK (wav48*/<speaker>/ + txt/<speaker>/)"
        COQUI = "coqui", "CSV audio_file|text|speaker_name"
        COMMONVOICE = "commonvoice", "Common Voice TSV"

    class Language(models.TextChoices):
        ENGLISH = "en", "English"
        PERSIAN = "fa", "Persian"

    # The statuses in which a task attempt holds the dataset.
    WORKING = (Status.IMPORTING, Status.PREPROCESSING)

    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="datasets"
    )
    name = models.CharField(max_length=200)
    source = models.CharField(max_length=16, choices=Source.choices, default=Source.UPLOAD)
    source_path = models.CharField(
        max_length=1000, blank=True, help_text="Where the raw files live."
    )
    format = models.CharField(max_length=16, choices=Format.choices, default=Format.AUTO)
    language = models.CharField(max_length=8, choices=Language.choices, default=Language.ENGLISH)
    status = models.CharField(
        max_length=16, choices=Status.choices, default=Status.NEW, db_index=True
    )
    status_message = models.TextField(blank=True)
    progress = models.FloatField(
        default=0.0, help_text="0-1 of the current step (import or preprocessing)."
    )
    eta_seconds = models.FloatField(null=True, blank=True)
    cache_dir = models.CharField(
        max_length=1000, blank=True, help_text="Cached features for training."
    )
    n_utterances = models.PositiveIntegerField(default=0)
    n_speakers = models.PositiveIntegerField(default=0)
    total_seconds = models.FloatField(default=0.0)
    problem_counts = models.JSONField(default=dict, blank=True)
    # The claim, as on Run: (worker, attempts) names the one task attempt that may write the
    # dataset's progress and status, so a second import cannot run beside a live one.
    worker = models.CharField(max_length=200, blank=True)
    attempts = models.PositiveIntegerField(default=0)
    # Attempts of the current step in a row whose worker vanished; STUDIO_MAX_ATTEMPTS ends them.
    retries = models.PositiveIntegerField(default=0)
    # Written by the database's clock only (Now()), so staleness never compares two machines'.
    heartbeat = models.DateTimeField(null=True, blank=True)
    # When a task for the dataset was sent and no worker has taken it yet: it is busy then too.
    queued_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created"]
        indexes = [models.Index(fields=["owner", "-created"]), models.Index(fields=["status"])]

    def __str__(self) -> str:
        return self.name

    def get_absolute_url(self) -> str:
        return f"/datasets/{self.pk}/"

    @property
    def hours(self) -> float:
        return self.total_seconds / 3600.0

    @property
    def is_ready(self) -> bool:
        """Only a preprocessed dataset can be trained on: training never decodes audio."""
        return self.status == self.Status.READY and bool(self.cache_dir)

    @property
    def is_busy(self) -> bool:
        """A step runs, or a task for one waits in the queue (so the page keeps polling)."""
        return self.status in self.WORKING or self.queued_at is not None

    def held_out_speakers(self) -> list[str]:
        """Names of the speakers kept out of training (scored as unseen voices), sorted."""
        return sorted(self.speakers.filter(held_out=True).values_list("name", flat=True))

    def clips_by_speaker(self) -> dict[str, list[tuple[str, str]]]:
        """Speaker -> (split, audio file) of each usable clip, in a stable order: what the
        scores clone voices from and compare them with."""
        clips: dict[str, list[tuple[str, str]]] = {}
        rows = (
            self.utterances.filter(usable=True, speaker__isnull=False)
            .exclude(audio_path="")
            .order_by("item_id")
            .values_list("speaker__name", "split", "audio_path")
        )
        for name, split, path in rows:
            clips.setdefault(name, []).append((split, path))
        return clips

    def set_progress(
        self, fraction: float, eta_seconds: float | None = None, message: str = ""
    ) -> None:
        """Write progress without touching other fields a concurrent writer may own; a claimed
        attempt writes (and beats) only while it still holds the dataset."""
        fields = {
            "progress": max(0.0, min(1.0, fraction)),
            "eta_seconds": eta_seconds,
            "updated": timezone.now(),
        }
        if message:
            fields["status_message"] = message
        if self.worker and self.status in self.WORKING:
            self.claimed().update(**fields, heartbeat=Now())
        else:
            Dataset.objects.filter(pk=self.pk).update(**fields)
        for k, v in fields.items():
            setattr(self, k, v)

    # -- the claim and heartbeat of the task working on the dataset (the same idea as Run's)

    def claimed(self) -> models.QuerySet:
        return Dataset.objects.filter(
            pk=self.pk, worker=self.worker, attempts=self.attempts, status__in=self.WORKING
        )

    def beat(self) -> bool:
        """Proof of life by the database's clock; False once the claim is gone."""
        return bool(self.claimed().update(heartbeat=Now()))

    def owner_gone(self, host: str) -> bool:
        """Is the task that holds this dataset certainly gone? (see studio.workers)"""
        age = workers.heartbeat_age(Dataset.objects.filter(pk=self.pk))
        if age is None:
            return True
        return workers.owner_gone(self.worker, age, host, settings.STUDIO_DATASET_STALE_SECONDS)

    def is_stale(self, host: str) -> bool:
        """A step that lost its worker: the only busy state in which a retry is offered."""
        return self.status in self.WORKING and self.queued_at is None and self.owner_gone(host)

    def mark_queued(self) -> None:
        Dataset.objects.filter(pk=self.pk).update(queued_at=Now())
        self.queued_at = timezone.now()  # a marker here; the row holds the database's time

    @classmethod
    def claim(cls, dataset_id: int, step: str, ident: str, host: str) -> tuple[Dataset | None, str]:
        """Take the dataset's `step` ("import" or "preprocess") for the worker process `ident`,
        or say why not: (dataset or None, how); how is "start" or "resume" when claimed."""
        due, working = {
            "import": ((cls.Status.NEW, cls.Status.IMPORTING), cls.Status.IMPORTING),
            "preprocess": (
                (cls.Status.IMPORTED, cls.Status.PREPROCESSING),
                cls.Status.PREPROCESSING,
            ),
        }[step]
        with transaction.atomic():
            dataset = cls.objects.select_for_update().filter(pk=dataset_id).first()
            if dataset is None:
                return None, "gone"
            if dataset.status not in due:
                # A stray or repeated message: nothing waits in the queue for this dataset now.
                cls.objects.filter(pk=dataset.pk).update(queued_at=None)
                return None, f"not due: {dataset.status}"
            if dataset.status == working and dataset.worker and not dataset.owner_gone(host):
                return None, f"busy: {dataset.worker}"  # a live attempt holds it
            how = "start"
            if dataset.status == working:
                # The step began before and its worker vanished (killed, out of memory).
                how = "resume"
                dataset.retries += 1
                limit = settings.STUDIO_MAX_ATTEMPTS
                if dataset.retries >= limit:
                    reason = (
                        f"Gave up after {limit} attempts in a row at the {step} step that ended "
                        "with the worker gone; the files may need more memory than the worker "
                        "has. Press Retry to try again."
                    )
                    cls.objects.filter(pk=dataset.pk).update(
                        status=cls.Status.FAILED,
                        status_message=reason,
                        retries=dataset.retries,
                        eta_seconds=None,
                        queued_at=None,
                        worker="",
                        updated=timezone.now(),
                    )
                    return None, "failed: " + reason
            else:
                dataset.retries = 0  # a fresh step: a fresh budget of automatic attempts
            dataset.status = working
            dataset.worker = ident
            dataset.attempts += 1
            dataset.heartbeat = Now()
            dataset.queued_at = None
            dataset.save(
                update_fields=[
                    "status",
                    "worker",
                    "attempts",
                    "retries",
                    "heartbeat",
                    "queued_at",
                    "updated",
                ]
            )
            dataset.refresh_from_db(fields=["heartbeat"])
            return dataset, how


class Speaker(Timestamped):
    owner_lookup = "dataset__owner"
    objects = OwnedQuerySet.as_manager()

    dataset = models.ForeignKey(Dataset, on_delete=models.CASCADE, related_name="speakers")
    name = models.CharField(max_length=200)
    n_utterances = models.PositiveIntegerField(default=0)
    total_seconds = models.FloatField(default=0.0)
    embedding = models.JSONField(null=True, blank=True, help_text="Mean 256-d speaker embedding.")
    # Kept out of training so the scores can clone a voice the model never heard (issue 14).
    held_out = models.BooleanField(
        default=False,
        help_text="Never trained on: scored as an unseen voice, cloned from 3 of its clips.",
    )

    class Meta:
        ordering = ["dataset", "name"]
        constraints = [
            models.UniqueConstraint(fields=["dataset", "name"], name="unique_speaker_per_dataset")
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.dataset})"

    @property
    def minutes(self) -> float:
        return self.total_seconds / 60.0


class Utterance(Timestamped):
    class Split(models.TextChoices):
        TRAIN = "train", "Train"
        VAL = "val", "Validation"
        NONE = "", "Not used"

    class Verdict(models.TextChoices):
        KEEP = "keep", "Keep"
        REVIEW = "review", "Review"
        DROP = "drop", "Drop"
        UNJUDGED = "", "Not judged"

    class Decision(models.TextChoices):
        KEEP = "keep", "Kept by a person"
        DROP = "drop", "Dropped by a person"
        NONE = "", "No decision"

    owner_lookup = "dataset__owner"
    objects = OwnedQuerySet.as_manager()

    dataset = models.ForeignKey(Dataset, on_delete=models.CASCADE, related_name="utterances")
    speaker = models.ForeignKey(
        Speaker, on_delete=models.SET_NULL, null=True, blank=True, related_name="utterances"
    )
    item_id = models.CharField(max_length=300)
    audio_path = models.CharField(max_length=1000, blank=True)
    text = models.TextField(blank=True)
    duration_seconds = models.FloatField(default=0.0)
    sample_rate = models.PositiveIntegerField(null=True, blank=True)
    split = models.CharField(max_length=8, choices=Split.choices, default=Split.NONE, blank=True)
    usable = models.BooleanField(
        default=True, db_index=True, help_text="False when a problem dropped it."
    )
    problems = models.JSONField(default=list, blank=True, help_text="[{code, message, severity}]")
    # The quality gate (training.clip_quality): its verdict, reasons in words and scores from
    # the last preprocessing, and a person's review decision, which wins at the next one.
    verdict = models.CharField(
        max_length=8, choices=Verdict.choices, default=Verdict.UNJUDGED, blank=True
    )
    verdict_reasons = models.JSONField(default=list, blank=True, help_text="[{code, message}]")
    quality = models.JSONField(default=dict, blank=True, help_text="the clip's quality scores")
    badness = models.FloatField(default=0.0, help_text="review queue order: higher is worse")
    review_decision = models.CharField(
        max_length=8, choices=Decision.choices, default=Decision.NONE, blank=True
    )
    reviewed_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="reviewed_utterances",
    )
    reviewed_at = models.DateTimeField(null=True, blank=True)
    original_text = models.TextField(
        blank=True, help_text="the transcript as imported, kept when a review edits it"
    )

    class Meta:
        ordering = ["dataset", "item_id"]
        constraints = [
            models.UniqueConstraint(fields=["dataset", "item_id"], name="unique_item_per_dataset")
        ]
        indexes = [
            models.Index(fields=["dataset", "usable"]),
            models.Index(fields=["dataset", "split"]),
        ]

    def __str__(self) -> str:
        return self.item_id

    @property
    def problem_codes(self) -> list[str]:
        return [p.get("code", "") for p in self.problems]

    def review(self, user, decision: str = "", text: str | None = None) -> None:
        """A person's decision on a clip in the review queue, recorded with who and when.

        `decision` is "keep" or "drop" (or "" to leave it); a new `text` replaces the
        transcript, the imported one kept in `original_text`. Both take effect at the next
        preprocessing, which redoes only the clips whose transcript changed.
        """
        if decision not in ("", self.Decision.KEEP, self.Decision.DROP):
            raise ValidationError(f"unknown review decision {decision!r}")
        fields = ["reviewed_by", "reviewed_at", "updated"]
        if decision:
            self.review_decision = decision
            fields.append("review_decision")
        if text is not None and text.strip() != self.text:
            if not text.strip():
                raise ValidationError("a transcript cannot be empty; drop the clip instead")
            if not self.original_text:
                self.original_text = self.text
            self.text = text.strip()
            fields += ["text", "original_text"]
        self.reviewed_by = user
        self.reviewed_at = timezone.now()
        self.save(update_fields=fields)


# --------------------------------------------------------------------------- training configs

WEIGHT_FIELDS = [
    "mel_loss_weight",
    "kl_loss_weight",
    "duration_loss_weight",
    "pitch_loss_weight",
    "energy_loss_weight",
    "align_loss_weight",
    "bin_loss_weight",
]


def _safe_help(name: str, text: str = "") -> str:
    """Help text that shows the range from the one table, so the form and the check never disagree."""
    return f"{text} {range_text(name).capitalize()}: {SAFE_RANGE_REASONS.get(name, '')}".strip()


# The schedule columns, in the order the form and the admin show them.
SCHEDULE_FIELDS = [
    "batch_size",
    "steps",
    "learning_rate",
    "lr_warmup_steps",
    "grad_clip_norm",
    "grad_accum_steps",
    "eval_every",
    "checkpoint_every",
    "seed",
]

# TrainingConfig columns that map one-to-one onto TrainConfig.flat() names.
CONFIG_COLUMNS = {*SCHEDULE_FIELDS, "use_adaptive_weights", "optimization_level", *WEIGHT_FIELDS}


class TrainingConfigQuerySet(OwnedQuerySet):
    def preset(self, owner, size: str, level: str) -> TrainingConfig:
        """The owner's saved copy of a preset, made on first use so a run can point at it."""
        name = f"Preset · {size} · {level.replace('_', ' ')}"
        config = self.filter(owner=owner, name=name).first()
        if config is not None:
            return config
        flat = preset(size, level).flat()
        columns = {k: v for k, v in flat.items() if k in CONFIG_COLUMNS}
        extra = {k: v for k, v in flat.items() if k not in CONFIG_COLUMNS and k != "size"}
        return self.create(
            owner=owner,
            name=name,
            description="Made from training.config.preset(); edit a copy to change it.",
            model_size=size,
            extra=extra,
            **columns,
        )


class TrainingConfig(Owned):
    objects = TrainingConfigQuerySet.as_manager()

    class Size(models.TextChoices):
        TINY = "tiny", "tiny (laptop CPU, minutes)"
        SMALL = "small", "small"
        NORMAL = "normal", "normal"
        BIG = "big", "big"

    class Level(models.TextChoices):
        BASIC = "basic", "basic"
        ENHANCED = "enhanced", "enhanced"
        PLATEAU_BREAKER = "plateau_breaker", "plateau breaker"

    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="training_configs"
    )
    name = models.CharField(max_length=200)
    description = models.TextField(blank=True)
    model_size = models.CharField(max_length=8, choices=Size.choices, default=Size.TINY)
    optimization_level = models.CharField(max_length=20, choices=Level.choices, default=Level.BASIC)
    batch_size = models.PositiveIntegerField(default=16)
    steps = models.PositiveIntegerField(default=2000)
    learning_rate = models.FloatField(default=1e-3, help_text=_safe_help("learning_rate"))
    lr_warmup_steps = models.PositiveIntegerField(default=100)
    grad_clip_norm = models.FloatField(default=1.0, help_text=_safe_help("grad_clip_norm"))
    grad_accum_steps = models.PositiveIntegerField(default=1)
    eval_every = models.PositiveIntegerField(default=200)
    checkpoint_every = models.PositiveIntegerField(default=500)
    seed = models.IntegerField(default=1234)
    mel_loss_weight = models.FloatField(default=2.5, help_text=_safe_help("mel_loss_weight"))
    kl_loss_weight = models.FloatField(
        default=1.0,
        help_text=_safe_help("kl_loss_weight", "Used only by models with a variational part."),
    )
    duration_loss_weight = models.FloatField(
        default=1.0, help_text=_safe_help("duration_loss_weight")
    )
    pitch_loss_weight = models.FloatField(default=0.1, help_text=_safe_help("pitch_loss_weight"))
    energy_loss_weight = models.FloatField(default=0.1, help_text=_safe_help("energy_loss_weight"))
    align_loss_weight = models.FloatField(default=1.0, help_text=_safe_help("align_loss_weight"))
    bin_loss_weight = models.FloatField(default=0.1, help_text=_safe_help("bin_loss_weight"))
    use_adaptive_weights = models.BooleanField(default=True)
    extra = models.JSONField(
        default=dict, blank=True, help_text="Further TrainConfig fields, by name."
    )

    class Meta:
        ordering = ["-created"]
        indexes = [models.Index(fields=["owner", "-created"])]

    def __str__(self) -> str:
        return f"{self.name} ({self.model_size}, {self.optimization_level})"

    def get_absolute_url(self) -> str:
        return reverse("config_edit", args=[self.pk])

    def values(self) -> dict:
        """The flat dict the training side understands (TrainConfig.from_flat)."""
        values = dict(self.extra or {})
        values.update(
            size=self.model_size,
            optimization_level=self.optimization_level,
            batch_size=self.batch_size,
            steps=self.steps,
            learning_rate=self.learning_rate,
            lr_warmup_steps=self.lr_warmup_steps,
            grad_clip_norm=self.grad_clip_norm,
            grad_accum_steps=self.grad_accum_steps,
            eval_every=self.eval_every,
            checkpoint_every=self.checkpoint_every,
            seed=self.seed,
            use_adaptive_weights=self.use_adaptive_weights,
        )
        values.update({name: getattr(self, name) for name in WEIGHT_FIELDS})
        return values

    def to_train_config(self) -> TrainConfig:
        return TrainConfig.from_flat(self.values())

    def clean(self):
        """Refuse anything outside the safe ranges, naming each field and its range."""
        super().clean()
        try:
            check_safe(self.values())
        except UnsafeConfig as exc:
            raise ValidationError(
                {
                    name: f"{msg}. {SAFE_RANGE_REASONS.get(name, '')}".strip()
                    for name, msg in exc.problems.items()
                    if name in {f.name for f in self._meta.fields}
                }
                or str(exc)
            ) from exc

    @property
    def batch_warning(self) -> str | None:
        if self.model_size not in BATCH_RANGES:
            return None
        return batch_warning(self.model_size, self.batch_size)


# --------------------------------------------------------------------------- runs


# The training task's name and queue (studio.runs.tasks); models send it by name.
TRAIN_TASK = "runs.train"
TRAIN_QUEUE = "gpu"
SCORE_TASK = "runs.score_checkpoint"
SCORE_QUEUE = "cpu"
# A "queued" score older than this is taken as lost (no cpu worker took it): it may be asked again.
SCORE_QUEUED_STALE_SECONDS = 15 * 60
# Processes (one per GPU, or gloo processes on a CPU) that one run may train on: one machine's
# worth; more machines go through torchrun's rendezvous by hand (README, "Scaling out").
RANKS_RANGE = (1, 8)


def validate_ranks(value: int) -> None:
    low, high = RANKS_RANGE
    if not low <= value <= high:
        raise ValidationError(f"ranks must be between {low} and {high} (got {value}).")


class Run(Owned):
    class Status(models.TextChoices):
        QUEUED = "queued", "Queued"
        RUNNING = "running", "Running"
        SUCCEEDED = "succeeded", "Succeeded"
        FAILED = "failed", "Failed"
        CANCELLED = "cancelled", "Cancelled"
        INTERRUPTED = "interrupted", "Interrupted"

    class Kind(models.TextChoices):
        ACOUSTIC = "acoustic", "Acoustic model"
        VOCODER = "vocoder", "Vocoder fine-tune"

    ACTIVE = (Status.QUEUED, Status.RUNNING)
    FINISHED = (Status.SUCCEEDED, Status.FAILED, Status.CANCELLED)

    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="runs"
    )
    name = models.CharField(max_length=200, blank=True)
    dataset = models.ForeignKey(Dataset, on_delete=models.PROTECT, related_name="runs")
    # What the run trains: a voice (text -> mel) or HiFi-GAN fine-tuned on the dataset.
    kind = models.CharField(
        max_length=16, choices=Kind.choices, default=Kind.ACOUSTIC, db_index=True
    )
    # Acoustic runs train with a saved config; a vocoder run's snapshot is a VocoderConfig.
    config = models.ForeignKey(
        TrainingConfig, on_delete=models.PROTECT, related_name="runs", null=True, blank=True
    )
    acoustic_checkpoint = models.ForeignKey(
        "Checkpoint",
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="vocoder_runs",
        help_text="Vocoder runs: learn from this acoustic checkpoint's teacher-forced mels "
        "(none: the recordings' own mels).",
    )
    # The config as it was when the run was created: editing a config never changes a run.
    config_snapshot = models.JSONField(default=dict)
    ranks = models.PositiveSmallIntegerField(
        default=1,
        validators=[validate_ranks],
        help_text="Processes the run trains on (DDP through torchrun): one per GPU of the "
        "worker that takes it; 1 trains in the worker itself.",
    )
    status = models.CharField(
        max_length=16, choices=Status.choices, default=Status.QUEUED, db_index=True
    )
    error = models.TextField(blank=True)
    resume_from = models.ForeignKey(
        "Checkpoint", on_delete=models.SET_NULL, null=True, blank=True, related_name="resumed_runs"
    )
    init_from = models.ForeignKey(
        "Checkpoint",
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="finetuned_runs",
        help_text="Fine-tune: start from these weights with a fresh optimiser.",
    )
    celery_task_id = models.CharField(max_length=64, blank=True)
    worker = models.CharField(max_length=200, blank=True)
    attempts = models.PositiveIntegerField(default=0)
    # Automatic attempts since a person last queued the run: a task that kills its worker
    # (out of memory) is redelivered, and past STUDIO_MAX_ATTEMPTS the run fails instead.
    retries = models.PositiveIntegerField(default=0)
    # Written by the database's clock only (Now()), so staleness never compares two machines'.
    heartbeat = models.DateTimeField(null=True, blank=True)
    cancel_requested = models.BooleanField(default=False)
    current_step = models.PositiveIntegerField(default=0)
    total_steps = models.PositiveIntegerField(default=0)
    last_loss = models.FloatField(null=True, blank=True)
    best_val_loss = models.FloatField(null=True, blank=True)
    out_dir = models.CharField(max_length=1000, blank=True)
    started = models.DateTimeField(null=True, blank=True)
    finished = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created"]
        indexes = [
            models.Index(fields=["owner", "-created"]),
            models.Index(fields=["status", "-created"]),
        ]

    def __str__(self) -> str:
        return self.name or f"Run {self.pk}"

    def get_absolute_url(self) -> str:
        return f"/runs/{self.pk}/"

    @property
    def is_active(self) -> bool:
        return self.status in self.ACTIVE

    @property
    def progress(self) -> float:
        return self.current_step / self.total_steps if self.total_steps else 0.0

    @property
    def can_resume(self) -> bool:
        return self.status in (self.Status.INTERRUPTED, self.Status.FAILED, self.Status.CANCELLED)

    def train_config(self) -> TrainConfig:
        return TrainConfig.from_flat(self.config_snapshot)

    def assign_out_dir(self) -> None:
        """Give the run a folder of its own that no other run has used.

        The worker resumes from whatever checkpoints lie in this folder, so a reused id (a
        database reset while the data folder stays, or test databases) must never land in
        an old run's folder: the id is followed by a random suffix.
        """
        runs = Path(settings.STUDIO_RUNS_DIR)
        while True:
            folder = runs / f"{self.pk}-{secrets.token_hex(4)}"
            if not folder.exists():
                break
        self.out_dir = str(folder)
        self.save(update_fields=["out_dir"])

    def request_cancel(self) -> None:
        """The worker polls this flag through should_stop(); a queued run is cancelled at once."""
        with transaction.atomic():
            run = Run.objects.select_for_update().get(pk=self.pk)
            run.cancel_requested = True
            if run.status == self.Status.QUEUED:
                run.status = self.Status.CANCELLED
                run.finished = timezone.now()
            run.save(update_fields=["cancel_requested", "status", "finished", "updated"])
        self.refresh_from_db()

    def mark_running(self, worker: str = "") -> None:
        self.status = self.Status.RUNNING
        self.worker = worker
        self.attempts += 1
        self.error = ""
        self.started = self.started or timezone.now()
        self.heartbeat = Now()
        self.save(
            update_fields=[
                "status",
                "worker",
                "attempts",
                "retries",
                "error",
                "started",
                "heartbeat",
                "updated",
            ]
        )
        self.refresh_from_db(fields=["heartbeat"])

    # -- the claim: (worker, attempts) names one attempt of one worker process. Every write of
    # a running attempt is conditional on it, so a worker that lost the run (declared dead
    # while it was only slow, and the run taken over) cannot overwrite its successor's work.

    def claimed(self) -> models.QuerySet:
        return Run.objects.filter(
            pk=self.pk, worker=self.worker, attempts=self.attempts, status=Run.Status.RUNNING
        )

    def holds_claim(self) -> bool:
        return self.claimed().exists()

    def beat(self) -> bool:
        """Proof of life by the database's clock; False once the claim is gone."""
        return bool(self.claimed().update(heartbeat=Now()))

    def heartbeat_age(self) -> float | None:
        """Seconds since the last heartbeat, both ends read from the database's clock."""
        row = Run.objects.filter(pk=self.pk).annotate(now=Now()).values("now", "heartbeat").first()
        if not row or row["heartbeat"] is None:
            return None
        return (row["now"] - row["heartbeat"]).total_seconds()

    def finish_claimed(self, status: str, error: str = "") -> bool:
        """mark_finished, only while this attempt still holds the run."""
        now = timezone.now()
        if not self.claimed().update(status=status, error=error, finished=now, updated=now):
            return False
        self.status, self.error, self.finished = status, error, now
        return True

    def mark_finished(self, status: str, error: str = "") -> None:
        self.status = status
        self.error = error
        self.finished = timezone.now()
        self.save(update_fields=["status", "error", "finished", "updated"])

    def mark_interrupted(self, reason: str) -> None:
        """A worker died under the run: keep everything, so a new worker resumes it."""
        self.status = self.Status.INTERRUPTED
        self.error = reason
        self.save(update_fields=["status", "error", "updated"])

    def event(self, kind: str, message: str, step: int | None = None, data=None) -> RunEvent:
        return RunEvent.objects.create(
            run=self,
            kind=kind,
            message=message,
            step=self.current_step if step is None else step,
            data=data or {},
        )

    def enqueue(self) -> None:
        """Send the run to the gpu queue once the transaction that saved it has committed.

        By task name, so the model needs no import of the task module (which imports models).
        """
        task_id = str(uuid.uuid4())
        Run.objects.filter(pk=self.pk).update(celery_task_id=task_id)
        self.celery_task_id = task_id
        pk = self.pk

        def send() -> None:
            try:
                current_app.send_task(TRAIN_TASK, args=(pk,), queue=TRAIN_QUEUE, task_id=task_id)
            except Exception as exc:  # kombu/redis raise many kinds; all mean "not queued"
                # Never left QUEUED with no message behind it: interrupted can be resumed.
                reason = (
                    f"could not reach the task queue ({type(exc).__name__}: {exc}); "
                    "press Resume when the queue is back"
                )
                Run.objects.filter(pk=pk, status=Run.Status.QUEUED).update(
                    status=Run.Status.INTERRUPTED, error=reason, updated=timezone.now()
                )

        transaction.on_commit(send)

    def requeue(self, by: str, steps: int | None = None) -> bool:
        """Queue a stopped run again to resume from its last checkpoint, optionally training it
        for longer. False when it cannot be resumed (a second click, or a worker got there)."""
        with transaction.atomic():
            run = Run.objects.select_for_update().get(pk=self.pk)
            if not run.can_resume:
                return False
            if steps:
                run.config_snapshot = dict(run.config_snapshot, steps=steps)
                run.total_steps = steps
            run.status = Run.Status.QUEUED
            run.cancel_requested = False
            run.error = ""
            run.finished = None
            run.retries = 0  # a person asked again: a fresh budget of automatic attempts
            run.save()
            more = f", training to step {steps}" if steps else ""
            run.event("status", f"resume requested by {by}{more}")
            run.enqueue()
        self.refresh_from_db()
        return True

    @classmethod
    def claim(cls, run_id: int, ident: str, host: str) -> tuple[Run | None, str]:
        """Take the run for the worker process `ident`, or say why not: (run or None, how).

        how is "start", "resume" or "redelivered" for a claimed run; otherwise the reason.
        """
        with transaction.atomic():
            run = cls.objects.select_for_update().filter(pk=run_id).first()
            if run is None:
                return None, "gone"
            if run.status in cls.FINISHED:
                return None, f"already {run.status}"
            # A live worker holds it (a duplicate message): that worker answers a cancel itself.
            if run.status == cls.Status.RUNNING and not run.owner_gone(host):
                elsewhere = workers.host_of(run.worker.rpartition(":")[0]) != host
                return None, ("busy elsewhere" if elsewhere else "duplicate") + f": {run.worker}"
            if run.cancel_requested:
                run.mark_finished(cls.Status.CANCELLED)
                return None, "cancelled before it started"
            how = "start"
            if run.status == cls.Status.RUNNING:
                how = "redelivered"
                run.event(
                    "interrupted",
                    f"worker {run.worker} was lost at step {run.current_step}; resuming",
                )
            elif run.status == cls.Status.INTERRUPTED or run.attempts > 0:
                how = "resume"
            if how == "redelivered" or run.status == cls.Status.INTERRUPTED:
                run.retries += 1
                limit = settings.STUDIO_MAX_ATTEMPTS
                if run.retries >= limit:
                    reason = (
                        f"gave up after {limit} attempts in a row that ended with the worker "
                        f"gone (last at step {run.current_step}); a step may need more memory "
                        "than the worker has: lower the batch size, then resume"
                    )
                    run.mark_finished(cls.Status.FAILED, reason)
                    run.save(update_fields=["retries"])
                    run.event("status", reason)
                    return None, "failed: " + reason
            run.mark_running(ident)
            if not run.out_dir:
                run.assign_out_dir()
            return run, how

    def owner_gone(self, host: str) -> bool:
        """Is the worker process that holds this run certainly gone? (see studio.workers)"""
        age = self.heartbeat_age()
        if age is None:  # a run from before heartbeats were kept: the row's own age
            age = (timezone.now() - self.updated).total_seconds()
        return workers.owner_gone(self.worker, age, host)

    def record_checkpoint(self, path: str | Path, info: dict) -> Checkpoint:
        """The trainer wrote a checkpoint: one row per step, one of them marked best; rows of
        files the trainer pruned go (the best one falls back to best.pt, the same weights)."""
        path = str(path)
        step = int(info["step"])
        val = info.get("val_loss")
        val = val if isinstance(val, float) and math.isfinite(val) else None
        size = Path(path).stat().st_size if Path(path).exists() else 0
        with transaction.atomic():
            if info.get("best"):
                # best.pt now holds `step`: a row that pointed at it for another step is stale.
                self.checkpoints.filter(path=path).exclude(step=step).delete()
                self.checkpoints.update(is_best=False)
                ckpt, created = Checkpoint.objects.get_or_create(
                    run=self,
                    step=step,
                    defaults={"path": path, "val_loss": val, "is_best": True, "size_bytes": size},
                )
                if not created:
                    ckpt.is_best, ckpt.val_loss = True, val if val is not None else ckpt.val_loss
                    ckpt.save(update_fields=["is_best", "val_loss", "updated"])
            else:
                ckpt, _ = Checkpoint.objects.update_or_create(
                    run=self,
                    step=step,
                    defaults={"path": path, "val_loss": val, "size_bytes": size},
                )
            best_path = Path(path).parent / "best.pt"
            for c in self.checkpoints.all():
                if Path(c.path).exists():
                    continue
                if c.is_best and best_path.exists():
                    c.path = str(best_path)
                    c.save(update_fields=["path", "updated"])
                else:
                    c.delete()
        return ckpt

    def latest_checkpoint(self) -> Checkpoint | None:
        return self.checkpoints.order_by("-step").first()


class MetricPoint(models.Model):
    """One scalar of one step. Unique on (run, step, name) so a resumed run never duplicates rows."""

    owner_lookup = "run__owner"
    objects = OwnedQuerySet.as_manager()

    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="metrics")
    step = models.PositiveIntegerField()
    name = models.CharField(max_length=64)
    value = models.FloatField()
    time = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["run", "step", "name"]
        constraints = [
            models.UniqueConstraint(fields=["run", "step", "name"], name="unique_metric_point")
        ]
        indexes = [models.Index(fields=["run", "name", "step"])]

    def __str__(self) -> str:
        return f"{self.run_id}@{self.step} {self.name}={self.value:.4g}"

    @classmethod
    def record(cls, run_id: int, step: int, metrics: dict, time=None) -> list[MetricPoint]:
        """Bulk-insert the numeric entries of one step's metrics; a repeat of a step is ignored."""
        time = time or timezone.now()
        rows = [
            cls(run_id=run_id, step=step, name=name[:64], value=float(value), time=time)
            for name, value in metrics.items()
            if name != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)
        ]
        return cls.objects.bulk_create(rows, ignore_conflicts=True)


class RunEvent(models.Model):
    """Something worth reading rather than plotting: an adaptive-weight decision, a skipped step,
    a rollback, a diagnosis, a status change, a log line."""

    owner_lookup = "run__owner"
    objects = OwnedQuerySet.as_manager()

    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="events")
    step = models.PositiveIntegerField(default=0)
    kind = models.CharField(max_length=32, db_index=True)
    message = models.TextField()
    data = models.JSONField(default=dict, blank=True)
    created = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["run", "step", "created"]
        indexes = [models.Index(fields=["run", "kind", "step"])]

    def __str__(self) -> str:
        return f"{self.run_id}@{self.step} {self.kind}: {self.message[:60]}"


class Checkpoint(Timestamped):
    owner_lookup = "run__owner"
    objects = OwnedQuerySet.as_manager()

    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="checkpoints")
    step = models.PositiveIntegerField()
    path = models.CharField(max_length=1000, help_text="Absolute path of the .pt file.")
    val_loss = models.FloatField(null=True, blank=True)
    is_best = models.BooleanField(default=False)
    size_bytes = models.BigIntegerField(default=0)
    scores = models.JSONField(
        default=dict, blank=True, help_text="Objective scores: SECS, MCD, WER, RTF."
    )

    class Meta:
        ordering = ["run", "-step"]
        constraints = [
            models.UniqueConstraint(fields=["run", "step"], name="unique_checkpoint_step")
        ]

    def __str__(self) -> str:
        return f"{self.run} step {self.step}"

    @property
    def scoring_pending(self) -> bool:
        """Queued for scoring, recently enough that a worker should still be on it.

        `scores` holds one of three shapes, told apart by "state": queued (the previous
        scores, if any, plus queued_at), done (synthesis.evaluate's dict plus scored_at and
        n), error (a readable message in "error", plus scored_at and n).
        """
        scores = self.scores or {}
        if scores.get("state") != "queued":
            return False
        try:
            age = timezone.now() - datetime.fromisoformat(scores.get("queued_at") or "")
        except (TypeError, ValueError):  # not a date, or one without a time zone
            return False
        return age.total_seconds() < SCORE_QUEUED_STALE_SECONDS

    def queue_scoring(self) -> bool:
        """Mark the checkpoint queued and send the scoring task once the transaction commits.
        False when it is already queued (a second click)."""
        if self.scoring_pending:
            return False
        self.scores = dict(self.scores or {}, state="queued", queued_at=timezone.now().isoformat())
        Checkpoint.objects.filter(pk=self.pk).update(scores=self.scores)
        pk = self.pk
        transaction.on_commit(
            lambda: current_app.send_task(SCORE_TASK, args=(pk,), queue=SCORE_QUEUE)
        )
        return True

    def record_scores(self, scores: dict) -> None:
        """Store what scoring found (already JSON-safe), whether scores or an error."""
        self.scores = scores
        Checkpoint.objects.filter(pk=self.pk).update(scores=scores)

    @property
    def label(self) -> str:
        val = f", val {self.val_loss:.3f}" if self.val_loss is not None else ""
        return f"{self.run} · step {self.step}{val}"


class AudioSample(Timestamped):
    owner_lookup = "run__owner"
    objects = OwnedQuerySet.as_manager()

    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="samples")
    step = models.PositiveIntegerField()
    utterance_id = models.CharField(max_length=300, blank=True)
    speaker = models.CharField(max_length=200, blank=True)
    text = models.TextField(blank=True)
    audio = models.FileField(upload_to="samples/%Y/%m/")
    mel_image = models.FileField(upload_to="samples/%Y/%m/", blank=True)

    class Meta:
        ordering = ["run", "-step"]
        indexes = [models.Index(fields=["run", "-step"])]

    def __str__(self) -> str:
        return f"{self.run} step {self.step} {self.utterance_id}"


def safe_ranges_table() -> list[dict]:
    """Rows for templates: each guarded field, its range and why."""
    return [
        {"name": name, "low": low, "high": high, "reason": SAFE_RANGE_REASONS.get(name, "")}
        for name, (low, high) in SAFE_RANGES.items()
    ]
