from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('annotate', '0023_ai_revision_side'),
    ]

    operations = [
        migrations.AddField(
            model_name='ailabelingrun',
            name='heartbeat_at',
            field=models.DateTimeField(blank=True, help_text='Refreshed by the worker while it runs; a stale one fails the run.', null=True),
        ),
    ]
