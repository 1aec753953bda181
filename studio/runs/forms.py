"""Starting a run: a ready dataset, a saved config or a preset, and where to start from; or,
for a run of kind "vocoder", HiFi-GAN fine-tuned on the dataset (training.vocoder).

Everything that decides whether a run may start is checked here against the one table in
training.config, and the resulting flat config is frozen into Run.config_snapshot; the worker
checks the snapshot again before it trains, so a row written by other means is refused too.
"""

from __future__ import annotations

from pathlib import Path

from django import forms
from django.db import transaction

from studio.models import RANKS_RANGE, Checkpoint, Dataset, Run, TrainingConfig
from training.config import (
    BATCH_RANGES,
    FEW_SHOT_CLIPS,
    OPTIMIZATION_LEVELS,
    TrainConfig,
    UnsafeConfig,
    batch_warning,
    check_safe,
    few_shot_preset,
    preset,
)
from training.vocoder import VocoderConfig


def preset_summaries() -> dict:
    """size -> level -> the few numbers a person picks a preset by (shown beside the form)."""
    out: dict = {}
    for size in BATCH_RANGES:
        out[size] = {}
        for level in OPTIMIZATION_LEVELS:
            cfg = preset(size, level)
            out[size][level] = {
                "learning_rate": cfg.learning_rate,
                "batch_size": cfg.batch_size,
                "grad_clip_norm": cfg.grad_clip_norm,
                "adaptive": cfg.loss.use_adaptive_weights,
                "steps": cfg.steps,
            }
    return out


class RunForm(forms.Form):
    SOURCES = [
        ("preset", "A preset (model size + optimization level)"),
        ("config", "A saved config"),
        ("fewshot", "A new voice: the few-shot fine-tune of a multi-speaker checkpoint"),
    ]
    STARTS = [
        ("scratch", "From scratch"),
        ("resume", "Resume from a checkpoint (weights, optimiser and step)"),
        ("finetune", "Fine-tune a checkpoint (its weights, a fresh optimiser)"),
    ]

    name = forms.CharField(max_length=200, required=False)
    kind = forms.ChoiceField(
        choices=[
            (Run.Kind.ACOUSTIC, "A voice (acoustic model: text to mel)"),
            (Run.Kind.VOCODER, "A vocoder (HiFi-GAN universal fine-tuned on this dataset)"),
        ],
        initial=Run.Kind.ACOUSTIC,
        required=False,
        widget=forms.RadioSelect,
    )
    acoustic_checkpoint = forms.ModelChoiceField(
        queryset=Checkpoint.objects.none(),
        required=False,
        label="Mels from an acoustic checkpoint (optional)",
        help_text="The vocoder learns from this model's teacher-forced mels of the dataset, the "
        "mels it will be given; empty: the recordings' own mels.",
    )
    dataset = forms.ModelChoiceField(
        queryset=Dataset.objects.none(),
        help_text="Only preprocessed (ready) datasets can be trained on.",
    )
    source = forms.ChoiceField(choices=SOURCES, initial="preset", widget=forms.RadioSelect)
    model_size = forms.ChoiceField(
        choices=TrainingConfig.Size.choices, initial=TrainingConfig.Size.TINY, required=False
    )
    optimization_level = forms.ChoiceField(
        choices=TrainingConfig.Level.choices, initial=TrainingConfig.Level.ENHANCED, required=False
    )
    config = forms.ModelChoiceField(queryset=TrainingConfig.objects.none(), required=False)
    steps = forms.IntegerField(required=False, min_value=1, max_value=10_000_000)
    batch_size = forms.IntegerField(required=False, min_value=1, max_value=4096)
    eval_every = forms.IntegerField(required=False, min_value=1, max_value=10_000_000)
    checkpoint_every = forms.IntegerField(required=False, min_value=1, max_value=10_000_000)
    # Bounds are checked in clean_ranks, so the refusal names the range.
    ranks = forms.IntegerField(
        required=False,
        initial=1,
        label="Ranks (GPUs)",
        help_text=f"Processes to train on, {RANKS_RANGE[0]}-{RANKS_RANGE[1]}: one per GPU of the "
        "worker (DDP). The batch size is per rank.",
    )
    start = forms.ChoiceField(choices=STARTS, initial="scratch", widget=forms.RadioSelect)
    checkpoint = forms.ModelChoiceField(queryset=Checkpoint.objects.none(), required=False)

    OVERRIDES = ("steps", "batch_size", "eval_every", "checkpoint_every")

    def __init__(self, user, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.user = user
        self.warnings: list[str] = []
        self.values: dict | None = None
        self.fields["dataset"].queryset = (
            Dataset.objects.visible_to(user)
            .filter(status=Dataset.Status.READY)
            .exclude(cache_dir="")
        )
        self.fields["config"].queryset = TrainingConfig.objects.visible_to(user)
        self.fields["checkpoint"].queryset = (
            Checkpoint.objects.visible_to(user).select_related("run").order_by("-created")
        )
        self.fields["checkpoint"].label_from_instance = lambda c: c.label
        self.fields["acoustic_checkpoint"].queryset = (
            Checkpoint.objects.visible_to(user)
            .filter(run__kind=Run.Kind.ACOUSTIC)
            .select_related("run")
            .order_by("-created")
        )
        self.fields["acoustic_checkpoint"].label_from_instance = lambda c: c.label
        for name in self.OVERRIDES:
            self.fields[name].help_text = "Leave empty to use the config's value."

    def clean_kind(self):
        return self.cleaned_data.get("kind") or Run.Kind.ACOUSTIC

    def clean_ranks(self):
        ranks = self.cleaned_data.get("ranks")
        if ranks is None:
            return 1
        low, high = RANKS_RANGE
        if not low <= ranks <= high:
            raise forms.ValidationError(f"Ranks must be between {low} and {high} (got {ranks}).")
        return ranks

    def clean(self):
        data = super().clean()
        if self.errors:
            return data
        if data["kind"] == Run.Kind.VOCODER:
            return self._clean_vocoder(data)
        if data["source"] == "config":
            config = data.get("config")
            if config is None:
                self.add_error("config", "Pick a saved config, or choose a preset instead.")
                return data
            values = config.values()
        elif data["source"] == "fewshot":
            values = self._few_shot_values(data)
            if values is None:
                return data
        else:
            size, level = data.get("model_size"), data.get("optimization_level")
            if not size:
                self.add_error("model_size", "Pick a model size.")
            if not level:
                self.add_error("optimization_level", "Pick an optimization level.")
            if not (size and level):
                return data
            values = preset(size, level).flat()
        for name in self.OVERRIDES:
            if data.get(name) is not None:
                values[name] = data[name]
        # The dataset's held-out speakers are frozen into the run, so a resume never trains on
        # a voice its scores treat as unseen, even if the dataset page changes later.
        held_out = set(values.get("held_out_speakers") or []) | set(
            data["dataset"].held_out_speakers()
        )
        values["held_out_speakers"] = sorted(held_out)
        values = TrainConfig.from_flat(values).flat()
        try:
            check_safe(values)
        except UnsafeConfig as exc:
            for name, message in exc.problems.items():
                self.add_error(name if name in self.fields else None, f"{name}: {message}")
            return data
        if values["eval_every"] > values["steps"]:
            self.warnings.append(
                f"eval every {values['eval_every']} steps is more than the run's "
                f"{values['steps']} steps: expect no eval samples before the end."
            )
        warning = batch_warning(values["size"], values["batch_size"])
        if warning:
            self.warnings.append(warning)
        self._clean_start(data, values)
        self.values = values
        return data

    def _few_shot_values(self, data: dict) -> dict | None:
        """training.config.few_shot_preset for the base checkpoint's size; the run fine-tunes
        that checkpoint whatever "start" says. Warns when the data is not what the preset is
        made for (one speaker, 30-100 clips) or the base knows a single voice."""
        ckpt = data.get("checkpoint")
        if ckpt is None:
            self.add_error(
                "checkpoint", "Pick the multi-speaker checkpoint the new voice starts from."
            )
            return None
        data["start"] = "finetune"
        size = (ckpt.run.config_snapshot or {}).get("size") or "tiny"
        dataset = data["dataset"]
        held_out = set(dataset.held_out_speakers())
        speakers = [
            s for s in dataset.speakers.filter(n_utterances__gt=0) if s.name not in held_out
        ]
        clips = sum(s.n_utterances for s in speakers)
        low, high = FEW_SHOT_CLIPS
        if len(speakers) != 1 or not low <= clips <= high:
            self.warnings.append(
                f"The few-shot preset is made for one speaker's {low}-{high} clips; this dataset "
                f"has {len(speakers)} speaker(s) and {clips} clips."
            )
        if ckpt.run.dataset.n_speakers < 2:
            self.warnings.append(
                f"{ckpt.label} was trained on {ckpt.run.dataset.n_speakers} speaker(s): a new "
                "voice starts best from a multi-speaker checkpoint."
            )
        return few_shot_preset(size).flat()

    def _clean_vocoder(self, data: dict) -> dict:
        """VocoderConfig's defaults (the HiFi-GAN recipe) with the length and batch overrides."""
        if data.get("ranks", 1) > 1:
            self.add_error("ranks", "A vocoder fine-tune trains on one rank: set ranks to 1.")
            return data
        values = VocoderConfig().to_dict()
        for name in self.OVERRIDES:
            if data.get(name) is not None:
                values[name] = data[name]
        try:
            VocoderConfig(**values).check()
        except ValueError as exc:
            self.add_error(None, str(exc))
            return data
        acoustic = data.get("acoustic_checkpoint")
        if acoustic is not None:
            if not Path(acoustic.path).is_file():
                self.add_error(
                    "acoustic_checkpoint", "That checkpoint's file is gone from the server."
                )
            elif data.get("dataset") and acoustic.run.dataset_id != data["dataset"].pk:
                self.warnings.append(
                    f"{acoustic.label} was trained on another dataset: the run fails at once "
                    "if its symbol table differs from this dataset's."
                )
        self._clean_start(data, values)
        self.values = values
        return data

    def _clean_start(self, data: dict, values: dict) -> None:
        start, ckpt = data["start"], data.get("checkpoint")
        if start == "scratch":
            data["checkpoint"] = None
            return
        if ckpt is None:
            self.add_error("checkpoint", "Pick the checkpoint to start from.")
            return
        if ckpt.run.kind != data["kind"]:
            self.add_error(
                "checkpoint",
                f"That is a checkpoint of a {ckpt.run.get_kind_display().lower()} run; this run "
                f"trains a {Run.Kind(data['kind']).label.lower()}.",
            )
            return
        if start == "resume" and data["kind"] == Run.Kind.VOCODER and ckpt.path.endswith("best.pt"):
            self.add_error(
                "checkpoint",
                "best.pt holds the generator alone: resume from a step checkpoint, or fine-tune "
                "this one.",
            )
        ckpt_size = (ckpt.run.config_snapshot or {}).get("size")
        if ckpt_size and ckpt_size != values.get("size"):
            self.add_error(
                "checkpoint",
                f"That checkpoint is of a '{ckpt_size}' model; this config trains a "
                f"'{values['size']}' one.",
            )
        if not Path(ckpt.path).is_file():
            self.add_error("checkpoint", "That checkpoint's file is gone from the server.")
        if start == "resume" and values["steps"] <= ckpt.step:
            self.add_error(
                "steps",
                f"Resuming continues from step {ckpt.step}: train for more steps than that.",
            )

    @transaction.atomic
    def save(self) -> Run:
        data = self.cleaned_data
        vocoder = data["kind"] == Run.Kind.VOCODER
        if vocoder:
            config = None  # the snapshot is a VocoderConfig; no saved acoustic config applies
        elif data["source"] == "config":
            config = data["config"]
        elif data["source"] == "fewshot":
            config = None  # the snapshot is training.config.few_shot_preset, not a saved config
        else:
            config = TrainingConfig.objects.preset(
                self.user, data["model_size"], data["optimization_level"]
            )
        ckpt = data.get("checkpoint")
        run = Run.objects.create(
            owner=self.user,
            name=data.get("name") or "",
            dataset=data["dataset"],
            kind=data["kind"],
            acoustic_checkpoint=data.get("acoustic_checkpoint") if vocoder else None,
            config=config,
            config_snapshot=self.values,
            ranks=data.get("ranks") or 1,
            total_steps=self.values["steps"],
            resume_from=ckpt if data["start"] == "resume" else None,
            init_from=ckpt if data["start"] == "finetune" else None,
        )
        run.assign_out_dir()
        return run


class ResumeForm(forms.Form):
    """Resume a stopped run where it left off, optionally training it for longer."""

    steps = forms.IntegerField(required=False, min_value=1, max_value=10_000_000)

    def __init__(self, run: Run, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.run = run

    def clean_steps(self):
        steps = self.cleaned_data.get("steps")
        if steps is not None and steps <= self.run.current_step:
            raise forms.ValidationError(
                f"The run is at step {self.run.current_step}: pick more steps than that."
            )
        return steps
