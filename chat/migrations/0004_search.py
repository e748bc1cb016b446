"""Full-text search (issue 9): FTS5 tables and triggers on SQLite, GIN indexes on PostgreSQL.

The SQL lives in chat.search, which also repairs the index after later schema changes (see
`chat.search.ensure_index`); this migration installs it and fills it from the existing rows.
"""

from django.db import migrations


def install(apps, schema_editor):
    from chat import search

    search.install(schema_editor.connection)


def uninstall(apps, schema_editor):
    from chat import search

    search.uninstall(schema_editor.connection)


class Migration(migrations.Migration):
    dependencies = [
        ("chat", "0003_branches_presets"),
        ("inference", "0006_provenance_workers"),
    ]

    operations = [migrations.RunPython(install, uninstall, elidable=False)]
