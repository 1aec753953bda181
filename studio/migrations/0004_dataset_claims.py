from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("studio", "0003_run_claims"),
    ]

    operations = [
        migrations.AddField(
            model_name="dataset",
            name="attempts",
            field=models.PositiveIntegerField(default=0),
        ),
        migrations.AddField(
            model_name="dataset",
            name="heartbeat",
            field=models.DateTimeField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name="dataset",
            name="queued_at",
            field=models.DateTimeField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name="dataset",
            name="retries",
            field=models.PositiveIntegerField(default=0),
        ),
        migrations.AddField(
            model_name="dataset",
            name="worker",
            field=models.CharField(blank=True, max_length=200),
        ),
    ]
