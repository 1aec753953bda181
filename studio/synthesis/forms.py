"""The fields of POST /api/synthesize, validated by a Form whether they came as form fields or JSON."""

from __future__ import annotations

from django import forms
from django.conf import settings


def _number(name: str, default: float) -> forms.FloatField:
    # Django's FloatField refuses NaN and infinities with the "invalid" message too.
    return forms.FloatField(
        required=False, initial=default, error_messages={"invalid": f"{name} must be a number"}
    )


class SynthesizeForm(forms.Form):
    checkpoint = forms.IntegerField(
        min_value=1,
        error_messages={
            "required": "Give the checkpoint's id as `checkpoint`.",
            "invalid": "Give the checkpoint's id as `checkpoint`.",
            "min_value": "Give the checkpoint's id as `checkpoint`.",
        },
    )
    text = forms.CharField(error_messages={"required": "Give the text to speak as `text`."})
    speed = _number("speed", 1.0)
    pitch = _number("pitch", 0.0)
    energy = _number("energy", 1.0)
    language = forms.ChoiceField(
        required=False,
        choices=[("", "the checkpoint's"), ("en", "English"), ("fa", "Persian")],
        error_messages={"invalid_choice": "language must be en or fa."},
    )
    speaker = forms.CharField(required=False)
    # hifigan, griffin-lim, or a fine-tuned vocoder's checkpoint id; resolved against the user's
    # own runs by studio.synthesis.vocoders.resolve (empty: the studio's default).
    vocoder = forms.CharField(
        required=False,
        max_length=100,
        error_messages={"max_length": "vocoder must be hifigan, griffin-lim or a checkpoint id."},
    )

    # The engine checks the ranges of speed, pitch and energy (it owns them); the form only
    # fills in the defaults of the fields left out.
    def clean(self):
        data = super().clean()
        for name in ("speed", "pitch", "energy"):
            if data.get(name) is None and name not in self.errors:
                data[name] = self.fields[name].initial
        text = data.get("text")
        limit = settings.STUDIO_MAX_SYNTH_CHARS
        if text and len(text) > limit:
            self.add_error("text", f"The text is {len(text)} characters; the limit is {limit}.")
        elif text:
            from training.text import normalize

            # Numbers are spelled out before speaking: "9" * 2000 would be far longer.
            spoken = len(normalize(text, data.get("language") or "en"))
            if spoken > limit:
                self.add_error(
                    "text",
                    f"Spelled out (numbers as words) the text is {spoken} characters; the "
                    f"limit is {limit}.",
                )
        return data

    def first_error(self) -> str:
        """One message for the JSON answer: the first field's first error."""
        for errors in self.errors.values():
            return str(errors[0])
        return "The request is not valid."
