"""The form of the configs area; validation comes from TrainingConfig.clean(), that is from
training.config.SAFE_RANGES, the one table the worker checks too."""

from django import forms

from studio.models import SCHEDULE_FIELDS, WEIGHT_FIELDS, TrainingConfig


class TrainingConfigForm(forms.ModelForm):
    class Meta:
        model = TrainingConfig
        fields = [
            "name",
            "description",
            "model_size",
            "optimization_level",
            *SCHEDULE_FIELDS,
            "use_adaptive_weights",
            *WEIGHT_FIELDS,
        ]
        widgets = {"description": forms.Textarea(attrs={"rows": 2})}
