"""The prompt tree and whose reply a generation is (schema only; 0003 moves the data)."""

import django.db.models.deletion
from django.conf import settings
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ("inference", "0001_initial"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.CreateModel(
            name="PromptMessage",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("role", models.CharField(choices=[("system", "System"), ("user", "User"), ("assistant", "Assistant")], max_length=16)),
                ("content", models.TextField(blank=True)),
                ("parent", models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.PROTECT, related_name="children", to="inference.promptmessage")),
            ],
        ),
        migrations.AddField(
            model_name="generation",
            name="prompt",
            field=models.ForeignKey(null=True, on_delete=django.db.models.deletion.PROTECT, related_name="generations", to="inference.promptmessage"),
        ),
        migrations.AddField(
            model_name="generation",
            name="user",
            field=models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.SET_NULL, related_name="generations", to=settings.AUTH_USER_MODEL),
        ),
        migrations.AddIndex(
            model_name="generation",
            index=models.Index(fields=["user", "state"], name="inference_gen_user_state"),
        ),
    ]
