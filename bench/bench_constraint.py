"""Per-step cost of a json_schema constraint on a real vocabulary (default: SmolLM2-135M, 49,152
tokens), next to the decode step it rides on.

- the grammar processor alone on the model's real logits, stepping through a valid reply
  (consume the token, fill llguidance's bitmask with its numpy helper, unpack, `mx.where`);
- inside an mlx-lm `BatchGenerator` like the engine's: the decode step without and with the
  constraint, in wall time and in this process's CPU time (which other load on a shared machine
  disturbs less), and the constraint's own work per step.

    .venv/bin/python bench/bench_constraint.py var/converted/<smollm2 folder> [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "age", "tags"],
}
REPLY = {"name": "Ada Lovelace", "age": 36, "tags": ["math", "poetry", "engines"]}


def main() -> None:
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import BatchGenerator

    from inference.constraints import (
        GrammarProcessor,
        constraint_tokenizer,
        grammar_for,
        new_matcher,
    )
    from inference.schemas import GenerationParams

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="an mlx-lm model folder")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()

    model, tokenizer = load(args.model)[:2]
    model.set_dtype(mx.float32)  # as the engine runs small models on the CPU
    vocab = model.args.vocab_size
    eos = sorted(tokenizer.eos_token_ids)
    began = time.perf_counter()
    ll_tokenizer = constraint_tokenizer(tokenizer._tokenizer, vocab_size=vocab, eos_ids=eos)
    print(f"vocabulary {vocab}; llguidance tokenizer {time.perf_counter() - began:.2f} s (once)")
    params = GenerationParams(response_format={"type": "json_schema", "json_schema": SCHEMA})
    grammar = grammar_for(params)
    assert grammar is not None
    began = time.perf_counter()
    new_matcher(ll_tokenizer, grammar)
    print(f"grammar compile {1000 * (time.perf_counter() - began):.2f} ms (once per request)")

    messages = [{"role": "user", "content": "Describe a person as JSON."}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    reply = tokenizer.encode(json.dumps(REPLY, separators=(",", ":")), add_special_tokens=False)
    processor = GrammarProcessor(new_matcher(ll_tokenizer, grammar), vocab, eos)
    logits = model(mx.array(prompt)[None])[:, -1, :]
    mx.eval(logits)
    context, alone = list(prompt), []
    for token in reply:
        tokens = mx.array(context)
        mx.eval(tokens)
        began = time.perf_counter()
        mx.eval(processor(tokens, logits))
        alone.append(time.perf_counter() - began)
        context.append(token)
    print(
        f"processor alone: median {1000 * statistics.median(alone):.3f} ms, "
        f"max {1000 * max(alone):.3f} ms over {len(alone)} steps"
    )

    own: list[float] = []

    class Timed(GrammarProcessor):
        def __call__(self, tokens: Any, logits: Any) -> Any:
            int(tokens[-1].item())  # the wait for the previous token is the step's, not ours
            began = time.perf_counter()
            out = super().__call__(tokens, logits)
            own.append(time.perf_counter() - began)
            return out

    def run(constrained: bool) -> tuple[float, float]:
        generator = BatchGenerator(model, max_tokens=args.tokens, completion_batch_size=8)
        processors: list[list[Any]] = (
            [[Timed(new_matcher(ll_tokenizer, grammar), vocab, eos)]] if constrained else [[]]
        )
        generator.insert([prompt], max_tokens=[args.tokens], logits_processors=processors)
        wall, cpu, count, done = [], [], 0, False
        while not done:
            w, c = time.perf_counter(), time.process_time()
            _, responses = generator.next()
            dw, dc = time.perf_counter() - w, time.process_time() - c
            for response in responses:
                count += 1
                if count > 3:  # past the prefill and the first steps
                    wall.append(dw)
                    cpu.append(dc)
                done = response.finish_reason is not None
        generator.close()
        return statistics.median(wall), statistics.median(cpu)

    results: dict[str, list[tuple[float, float]]] = {"free": [], "json_schema": []}
    for _ in range(args.rounds):  # interleaved, so drifting load hits both alike
        results["free"].append(run(False))
        results["json_schema"].append(run(True))
    for name, runs in results.items():
        wall = statistics.median(r[0] for r in runs)
        cpu = statistics.median(r[1] for r in runs)
        print(f"decode step, {name:11s}: wall {1000 * wall:.1f} ms, cpu {1000 * cpu:.1f} ms")
    print(
        f"constraint's own work in the batch: median {1000 * statistics.median(own):.3f} ms "
        f"over {len(own)} steps"
    )


if __name__ == "__main__":
    main()
