"""Generations no longer copy their prompt: it lives in the prompt tree (0003)."""

from django.db import migrations


class Migration(migrations.Migration):

    dependencies = [
        ("inference", "0003_generation_messages_to_prompt_tree"),
    ]

    operations = [
        migrations.RemoveField(model_name="generation", name="messages"),
    ]
