"""Full-text search (issue 9): FTS5 tables and triggers on SQLite, GIN indexes on PostgreSQL.

The SQL lives in chat.search; this migration creates the index and fills it from the existing
rows. On SQLite the triggers that keep it right are created after migrations run, by the
post-migrate hook in chat.apps (see `chat.search.drop_before_migrate`).
"""

from django.db import migrations


def install(apps, schema_editor):
    from chat import search

    # SQLite: the tables and their content now; the triggers come after the whole migration
    # run (chat.search.repair_after_migrate), since a later migration in the same run may
    # rebuild a table that they name.
    search.install(schema_editor.connection, triggers=False)


def uninstall(apps, schema_editor):
    from chat import search

    search.uninstall(schema_editor.connection)


class Migration(migrations.Migration):
    dependencies = [
        ("chat", "0003_branches_presets"),
        ("inference", "0006_provenance_workers"),
    ]

    operations = [migrations.RunPython(install, uninstall, elidable=False)]
