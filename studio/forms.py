from django import forms

from studio.models import TrainingConfig


class TrainingConfigForm(forms.ModelForm):
    """Validation comes from TrainingConfig.clean(), i.e. from training.config.SAFE_RANGES."""

    class Meta:
        model = TrainingConfig
        fields = [
            "name", "description", "model_size", "optimization_level", "batch_size", "steps",
            "learning_rate", "lr_warmup_steps", "grad_clip_norm", "grad_accum_steps",
            "eval_every", "checkpoint_every", "seed", "use_adaptive_weights",
            "mel_loss_weight", "kl_loss_weight", "duration_loss_weight", "pitch_loss_weight",
            "energy_loss_weight", "align_loss_weight", "bin_loss_weight",
        ]  # fmt: skip
        widgets = {"description": forms.Textarea(attrs={"rows": 2})}
