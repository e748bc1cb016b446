"""Move each generation's copy of its prompt (`messages`) into the prompt tree.

Rows are read oldest first and a message becomes a new node only when no node with the same
parent, role and content exists yet, so the turns of one conversation, which repeat the prompt
before them, share their common prefix again. Without the conversation (a chat table, which this
app must not read) two conversations that began with the same words share those first nodes;
nothing shows a node, so that is only storage saved.
"""

import hashlib

from django.db import migrations


def _key(parent_id, role, content):
    digest = hashlib.sha256(content.encode("utf-8", "surrogatepass")).digest()
    return parent_id, role, digest


def messages_to_tree(apps, schema_editor):
    Generation = apps.get_model("inference", "Generation")
    PromptMessage = apps.get_model("inference", "PromptMessage")
    nodes = {}
    rows = Generation.objects.filter(prompt__isnull=True).order_by("id").only("id", "messages")
    for generation in rows.iterator(chunk_size=500):
        parent_id = None
        for message in generation.messages or []:
            role, content = str(message.get("role", "")), str(message.get("content", ""))
            key = _key(parent_id, role, content)
            node_id = nodes.get(key)
            if node_id is None:
                node_id = PromptMessage.objects.create(
                    parent_id=parent_id, role=role, content=content
                ).pk
                nodes[key] = node_id
            parent_id = node_id
        if parent_id is not None:
            Generation.objects.filter(pk=generation.pk).update(prompt_id=parent_id)


def tree_to_messages(apps, schema_editor):
    Generation = apps.get_model("inference", "Generation")
    PromptMessage = apps.get_model("inference", "PromptMessage")
    nodes = {
        pk: (parent_id, role, content)
        for pk, parent_id, role, content in PromptMessage.objects.values_list(
            "id", "parent_id", "role", "content"
        ).iterator()
    }
    rows = Generation.objects.filter(prompt__isnull=False).only("id", "prompt_id")
    for generation in rows.iterator(chunk_size=500):
        messages = []
        node_id = generation.prompt_id
        while node_id is not None:
            node_id, role, content = nodes[node_id]
            messages.append({"role": role, "content": content})
        messages.reverse()
        Generation.objects.filter(pk=generation.pk).update(messages=messages, prompt_id=None)
    # One DELETE: the collector would refuse, as every node but the leaves PROTECTs a child.
    PromptMessage.objects.all()._raw_delete(schema_editor.connection.alias)


class Migration(migrations.Migration):

    dependencies = [
        ("inference", "0002_promptmessage_generation_prompt_user"),
    ]

    operations = [migrations.RunPython(messages_to_tree, tree_to_messages)]
