from django.db import migrations, models

import studio.models


class Migration(migrations.Migration):
    dependencies = [
        ("studio", "0005_clip_quality"),
    ]

    operations = [
        migrations.AddField(
            model_name="run",
            name="ranks",
            field=models.PositiveSmallIntegerField(
                default=1,
                help_text="Processes the run trains on (DDP through torchrun): one per GPU of "
                "the worker that takes it; 1 trains in the worker itself.",
                validators=[studio.models.validate_ranks],
            ),
        ),
    ]
