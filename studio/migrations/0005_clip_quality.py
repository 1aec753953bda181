import django.db.models.deletion
from django.conf import settings
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
        ("studio", "0004_dataset_claims"),
    ]

    operations = [
        migrations.AddField(
            model_name="utterance",
            name="badness",
            field=models.FloatField(default=0.0, help_text="review queue order: higher is worse"),
        ),
        migrations.AddField(
            model_name="utterance",
            name="original_text",
            field=models.TextField(
                blank=True, help_text="the transcript as imported, kept when a review edits it"
            ),
        ),
        migrations.AddField(
            model_name="utterance",
            name="quality",
            field=models.JSONField(blank=True, default=dict, help_text="the clip's quality scores"),
        ),
        migrations.AddField(
            model_name="utterance",
            name="review_decision",
            field=models.CharField(
                blank=True,
                choices=[
                    ("keep", "Kept by a person"),
                    ("drop", "Dropped by a person"),
                    ("", "No decision"),
                ],
                default="",
                max_length=8,
            ),
        ),
        migrations.AddField(
            model_name="utterance",
            name="reviewed_at",
            field=models.DateTimeField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name="utterance",
            name="reviewed_by",
            field=models.ForeignKey(
                blank=True,
                null=True,
                on_delete=django.db.models.deletion.SET_NULL,
                related_name="reviewed_utterances",
                to=settings.AUTH_USER_MODEL,
            ),
        ),
        migrations.AddField(
            model_name="utterance",
            name="verdict",
            field=models.CharField(
                blank=True,
                choices=[
                    ("keep", "Keep"),
                    ("review", "Review"),
                    ("drop", "Drop"),
                    ("", "Not judged"),
                ],
                default="",
                max_length=8,
            ),
        ),
        migrations.AddField(
            model_name="utterance",
            name="verdict_reasons",
            field=models.JSONField(blank=True, default=list, help_text="[{code, message}]"),
        ),
    ]
