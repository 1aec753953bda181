from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("studio", "0006_run_ranks"),
    ]

    operations = [
        migrations.AddField(
            model_name="speaker",
            name="held_out",
            field=models.BooleanField(
                default=False,
                help_text="Never trained on: scored as an unseen voice, cloned from 3 of its clips.",
            ),
        ),
    ]
