from django.contrib import admin

from studio.models import (
    SCHEDULE_FIELDS,
    WEIGHT_FIELDS,
    AudioSample,
    Checkpoint,
    Dataset,
    MetricPoint,
    Run,
    RunEvent,
    Speaker,
    TrainingConfig,
    Utterance,
)


@admin.register(Dataset)
class DatasetAdmin(admin.ModelAdmin):
    list_display = [
        "name",
        "owner",
        "status",
        "format",
        "language",
        "n_utterances",
        "n_speakers",
        "created",
    ]
    list_filter = ["status", "format", "language", "source"]
    search_fields = ["name", "owner__username", "source_path"]
    # Paths come from the upload or the register form, which check them against the allowed
    # roots; the admin must not be a way round that check.
    readonly_fields = ["created", "updated", "problem_counts", "source", "source_path"]
    raw_id_fields = ["owner"]


@admin.register(Speaker)
class SpeakerAdmin(admin.ModelAdmin):
    list_display = ["name", "dataset", "n_utterances", "total_seconds"]
    list_filter = ["dataset"]
    search_fields = ["name", "dataset__name"]
    exclude = ["embedding"]


@admin.register(Utterance)
class UtteranceAdmin(admin.ModelAdmin):
    list_display = ["item_id", "dataset", "speaker", "duration_seconds", "split", "usable"]
    list_filter = ["usable", "split", "dataset"]
    search_fields = ["item_id", "text", "speaker__name"]
    raw_id_fields = ["dataset", "speaker"]
    list_select_related = ["dataset", "speaker"]
    readonly_fields = ["audio_path"]  # written by the import, which checks it


@admin.register(TrainingConfig)
class TrainingConfigAdmin(admin.ModelAdmin):
    """Editable here; TrainingConfig.clean() refuses anything outside the safe ranges."""

    list_display = [
        "name",
        "owner",
        "model_size",
        "optimization_level",
        "batch_size",
        "mel_loss_weight",
        "created",
    ]
    list_filter = ["model_size", "optimization_level", "use_adaptive_weights"]
    search_fields = ["name", "description", "owner__username"]
    raw_id_fields = ["owner"]
    fieldsets = [
        (None, {"fields": ["owner", "name", "description", "model_size", "optimization_level"]}),
        (
            "Schedule",
            {"fields": SCHEDULE_FIELDS},
        ),
        (
            "Loss weights (safe ranges enforced)",
            {"fields": ["use_adaptive_weights", *WEIGHT_FIELDS]},
        ),
        ("Advanced", {"fields": ["extra"], "classes": ["collapse"]}),
    ]


class CheckpointInline(admin.TabularInline):
    model = Checkpoint
    extra = 0
    fields = ["step", "val_loss", "is_best", "size_bytes", "path"]
    readonly_fields = fields


@admin.register(Run)
class RunAdmin(admin.ModelAdmin):
    list_display = [
        "__str__",
        "owner",
        "kind",
        "status",
        "dataset",
        "config",
        "current_step",
        "last_loss",
        "created",
    ]
    list_filter = ["kind", "status", "config__model_size"]
    search_fields = ["name", "owner__username", "dataset__name", "error"]
    raw_id_fields = [
        "owner",
        "dataset",
        "config",
        "resume_from",
        "init_from",
        "acoustic_checkpoint",
    ]
    readonly_fields = [
        "config_snapshot",
        "celery_task_id",
        "worker",
        "attempts",
        "started",
        "finished",
    ]
    list_select_related = ["owner", "dataset", "config"]
    inlines = [CheckpointInline]


@admin.register(MetricPoint)
class MetricPointAdmin(admin.ModelAdmin):
    list_display = ["run", "step", "name", "value", "time"]
    list_filter = ["name"]
    search_fields = ["name", "run__name"]
    raw_id_fields = ["run"]
    list_select_related = ["run"]
    show_full_result_count = False  # millions of rows: skip the COUNT(*)


@admin.register(RunEvent)
class RunEventAdmin(admin.ModelAdmin):
    list_display = ["run", "step", "kind", "message", "created"]
    list_filter = ["kind"]
    search_fields = ["message", "run__name"]
    raw_id_fields = ["run"]


@admin.register(Checkpoint)
class CheckpointAdmin(admin.ModelAdmin):
    list_display = ["run", "step", "val_loss", "is_best", "size_bytes", "created"]
    list_filter = ["is_best"]
    search_fields = ["run__name", "path"]
    raw_id_fields = ["run"]


@admin.register(AudioSample)
class AudioSampleAdmin(admin.ModelAdmin):
    list_display = ["run", "step", "utterance_id", "speaker", "created"]
    search_fields = ["utterance_id", "speaker", "text", "run__name"]
    raw_id_fields = ["run"]
