"""Token traces are stored as JSON: a token a grammar forbade (logprob -inf) must not break it."""

from __future__ import annotations

import json

from inference.provenance import trace_entry


def test_a_forbidden_alternative_is_left_out_and_the_entry_is_valid_json() -> None:
    entry = {
        "token": "{",
        "id": 90,
        "logprob": 0.0,
        "top_ids": [90, 12, 7],
        "top_logprobs": [
            {"token": "{", "logprob": 0.0},
            {"token": "Hi", "logprob": float("-inf")},
            {"token": "[", "logprob": float("-inf")},
        ],
    }

    stored = trace_entry(entry)

    assert stored["top"] == [{"token": "{", "logprob": 0.0, "id": 90}]
    json.loads(json.dumps(stored, allow_nan=False))  # strict JSON, as the database checks it
    impossible = trace_entry({"token": "x", "logprob": float("-inf")})
    assert impossible["logprob"] is None
