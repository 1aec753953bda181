"""What the dataset pages read: problem tables, the problems CSV, splits, examples, pictures."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from pathlib import Path

from studio.models import Dataset, Utterance
from synthesis import pictures
from synthesis.pictures import png_bytes

BATCH = 500


def problem_table(dataset: Dataset) -> list[dict]:
    """Counts by problem code with severity and one example message, most frequent first."""
    rows: dict[str, dict] = {}
    root = _corpus_root(dataset)
    for problems in dataset.utterances.exclude(problems=[]).values_list("problems", flat=True):
        for p in problems:
            row = rows.setdefault(
                p["code"],
                {
                    "code": p["code"],
                    "count": 0,
                    "errors": 0,
                    "example": without_server_paths(p["message"], root),
                },
            )
            row["count"] += 1
            row["errors"] += p.get("severity") == "error"
    return sorted(rows.values(), key=lambda r: (-r["count"], r["code"]))


def problem_csv_rows(dataset: Dataset) -> Iterator[list[str]]:
    """One line per problem; the quality gate's review and drop verdicts are problems too
    (codes quality_review / quality_drop), each with its verdict and its worst reason."""
    yield ["item_id", "speaker", "file", "code", "severity", "kept", "verdict", "reason", "message"]
    utterances = dataset.utterances.exclude(problems=[]).select_related("speaker")
    root = _corpus_root(dataset)
    for u in utterances.iterator(chunk_size=BATCH):
        reason = u.verdict_reasons[0]["code"] if u.verdict_reasons else ""
        for p in u.problems:
            yield [
                u.item_id,
                u.speaker.name if u.speaker else "",
                shown_path(u.audio_path, root),
                p["code"],
                p.get("severity", ""),
                "yes" if u.usable else "no",
                u.verdict,
                reason if u.verdict in ("review", "drop") else "",
                without_server_paths(p["message"], root),
            ]


def _corpus_root(dataset: Dataset) -> Path | None:
    from studio.datasets.importing import raw_dir

    try:
        return raw_dir(dataset).resolve()
    except (OSError, RuntimeError):
        return None


def shown_path(path: str, root: Path | None) -> str:
    """A file as the person knows it: relative to their corpus, never the server's layout."""
    if not path:
        return ""
    p = Path(path)
    if root is not None and p.is_absolute():
        try:
            return p.resolve().relative_to(root).as_posix()
        except (ValueError, OSError, RuntimeError):
            pass
    return p.name if p.is_absolute() else p.as_posix()


def without_server_paths(message: str, root: Path | None) -> str:
    """A message with the server's folders cut out (an OSError names the full path)."""
    from django.conf import settings

    prefixes = [str(root)] if root is not None else []
    prefixes += [str(settings.MEDIA_ROOT), str(settings.DATA_DIR)]
    for prefix in sorted(set(prefixes), key=len, reverse=True):
        message = message.replace(prefix.rstrip("/") + "/", "").replace(prefix, "")
    return message


# A spreadsheet runs a cell that starts with one of these as a formula (tab and carriage
# return too: some programs strip them and then read what follows).
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_line(row: list[str]) -> str:
    """One CSV line; cells that a spreadsheet would run as a formula get a leading quote."""
    buffer = io.StringIO()
    safe = ["'" + c if c.startswith(FORMULA_STARTS) else c for c in map(str, row)]
    csv.writer(buffer).writerow(safe)
    return buffer.getvalue()


def split_counts(dataset: Dataset) -> dict[str, dict]:
    from django.db.models import Count, Sum

    counts = {"train": {"n": 0, "seconds": 0.0}, "val": {"n": 0, "seconds": 0.0}}
    rows = (
        dataset.utterances.filter(usable=True)
        .exclude(split="")
        .values("split")
        .annotate(n=Count("id"), seconds=Sum("duration_seconds"))
    )
    for row in rows:
        counts[row["split"]] = {"n": row["n"], "seconds": row["seconds"] or 0.0}
    for value in counts.values():
        value["minutes"] = value["seconds"] / 60.0
    return counts


def examples(dataset: Dataset, n: int = 4) -> list[Utterance]:
    """One usable utterance from each of the first speakers, so the page sounds like the set."""
    picked: list[Utterance] = []
    usable = dataset.utterances.filter(usable=True).exclude(audio_path="")
    for speaker in dataset.speakers.filter(n_utterances__gt=0)[:n]:
        u = usable.filter(speaker=speaker).first()
        if u is not None:
            picked.append(u)
    if len(picked) < n:
        seen = {u.pk for u in picked}
        picked += [u for u in usable[: n * 2] if u.pk not in seen][: n - len(picked)]
    return picked


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="tight")
    FigureCanvasAgg(fig)
    return fig


def duration_histogram_png(dataset: Dataset) -> bytes:
    durations = list(
        dataset.utterances.filter(usable=True).values_list("duration_seconds", flat=True)
    )
    fig = _figure(6.0, 2.4)
    ax = fig.add_subplot()
    if durations:
        ax.hist(durations, bins=min(40, max(5, len(durations) // 10)), color="#4f6bed")
    else:
        ax.text(0.5, 0.5, "no usable utterances yet", ha="center", va="center", color="#777")
    ax.set_xlabel("duration (s)")
    ax.set_ylabel("utterances")
    ax.spines[["top", "right"]].set_visible(False)
    return png_bytes(fig)


def utterance_mel(utterance: Utterance):
    """The log-mel of an utterance: from the feature cache when it is there, else from audio."""
    import torch

    dataset = utterance.dataset
    if dataset.cache_dir:
        from training.preprocess import feature_name

        path = Path(dataset.cache_dir) / feature_name(utterance.item_id)
        if path.is_file():
            feats = torch.load(path, map_location="cpu", weights_only=True)
            return feats["mel"].float().numpy()
    from training.audio import load_audio, mel_spectrogram

    wav, _ = load_audio(utterance.audio_path)
    return mel_spectrogram(wav).numpy()


def mel_png(utterance: Utterance) -> bytes:
    return pictures.mel_png(utterance_mel(utterance), size=(6.0, 1.8), axes=False)


# --------------------------------------------------------------------------- the quality gate

REVIEW_PAGE = 20


def review_queue(dataset: Dataset, limit: int = REVIEW_PAGE) -> list[Utterance]:
    """Clips the gate sent to review or dropped, worst first; those a person already decided
    on come after the undecided ones."""
    from django.db.models import Case, IntegerField, Value, When

    flagged = dataset.utterances.filter(verdict__in=["review", "drop"]).select_related(
        "speaker", "reviewed_by"
    )
    undecided_first = Case(
        When(review_decision="", then=Value(0)), default=Value(1), output_field=IntegerField()
    )
    return list(flagged.order_by(undecided_first, "-badness", "item_id")[:limit])


def review_counts(dataset: Dataset) -> dict[str, int]:
    from django.db.models import Count

    counts = {"keep": 0, "review": 0, "drop": 0, "decided": 0, "pending_changes": 0}
    for row in dataset.utterances.exclude(verdict="").values("verdict").annotate(n=Count("id")):
        counts[row["verdict"]] = row["n"]
    decided = dataset.utterances.exclude(review_decision="")
    counts["decided"] = decided.count()
    # Decisions the last preprocessing has not applied yet (its verdict still differs).
    counts["pending_changes"] = (
        decided.filter(review_decision="keep").exclude(verdict="keep").count()
        + decided.filter(review_decision="drop").exclude(verdict="drop").count()
    )
    counts["edited"] = dataset.utterances.exclude(original_text="").count()
    return counts


def left_out(dataset: Dataset) -> dict[str, int]:
    """How many clips of each kind training leaves out: the gate's drops by their worst reason,
    and the files earlier checks refused (undecodable, silent, no transcript...)."""
    from training.clip_quality import REASON_KINDS

    counts: dict[str, int] = {}
    for verdict, reasons, problems in dataset.utterances.filter(usable=False).values_list(
        "verdict", "verdict_reasons", "problems"
    ):
        if verdict == "drop" and reasons:
            label = REASON_KINDS.get(reasons[0]["code"], reasons[0]["code"])
        else:
            errors = [p["code"] for p in problems if p.get("severity") == "error"]
            label = (errors[0] if errors else "unusable").replace("_", " ")
        counts[label] = counts.get(label, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


# Scores pictured per speaker: (key in Utterance.quality, axis label).
QUALITY_PICTURES = [
    ("snr_db", "SNR estimate (dB)"),
    ("voiced_share", "voiced share"),
    ("similarity", "similarity to the speaker's voice"),
    ("rate", "phonemes per voiced second"),
    ("untranscribed_s", "speech outside the aligned words (s)"),
    ("wer", "word error rate (clips heard)"),
]
MAX_PICTURED_SPEAKERS = 8


def quality_histogram_png(dataset: Dataset, speaker: str = "") -> bytes:
    """The distribution of each score, one outline per speaker, so a speaker whose data is not
    clean stands out. Only the first speakers by name unless one is asked for."""
    rows = dataset.utterances.exclude(verdict="").select_related("speaker")
    if speaker:
        rows = rows.filter(speaker__name=speaker)
    by_speaker: dict[str, list[dict]] = {}
    for name, quality in rows.values_list("speaker__name", "quality"):
        by_speaker.setdefault(name or "", []).append(quality)
    names = sorted(by_speaker)[:MAX_PICTURED_SPEAKERS]
    fig = _figure(6.0, 1.7 * len(QUALITY_PICTURES))
    for n, (key, label) in enumerate(QUALITY_PICTURES, 1):
        ax = fig.add_subplot(len(QUALITY_PICTURES), 1, n)
        drawn = False
        for name in names:
            values = [q[key] for q in by_speaker[name] if q.get(key) is not None]
            if values:
                ax.hist(values, bins=20, histtype="step", linewidth=1.4, label=name)
                drawn = True
        if not drawn:
            ax.text(0.5, 0.5, "no scores yet", ha="center", va="center", color="#777")
        ax.set_xlabel(label)
        ax.set_ylabel("clips")
        ax.spines[["top", "right"]].set_visible(False)
        if drawn and n == 1:
            ax.legend(fontsize=7, ncol=4, frameon=False)
    return png_bytes(fig)
