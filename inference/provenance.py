"""Where a reply came from (issue 9): enough to say which weights, template and sampler wrote
it, and to replay it exactly.

Two halves, recorded in `Generation.provenance`:

- `request_provenance` (the web side, when the row is made): the sampler settings and the seed
  actually used. A request that gave no seed gets one picked here, so that sampling is
  replayable (the engine's seeded sampler still batches with other requests).
- `model_provenance` (the engine thread, once per loaded model, merged in by the worker when
  the reply starts): model id, kind, revision, a fingerprint of the weights, quantization,
  the chat template's hash, the compute dtype and device, mlx and mlx-lm versions.

Nothing here hashes whole weight files: a multi-GB model would cost seconds per load. The
fingerprint reads the size and the first and last MiB of each weights file (a safetensors
header at the start lists every tensor's offsets; GGUF's metadata and tensor table are at the
start too), which tells two files apart in practice, and says so in its name.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import secrets
import threading
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from inference.schemas import GenerationParams

if TYPE_CHECKING:
    from inference.loader import LoadedModel

logger = logging.getLogger(__name__)

# The sampler settings that decide which tokens are drawn (max_tokens and stop decide where
# the reply ends; both are kept too, since replaying needs them).
SAMPLER_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "max_tokens",
    "stop",
)
FINGERPRINT_SPAN = 1 << 20  # bytes read at each end of a weights file
# The files whose bytes are the model: weights and what shapes them.
_WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".npz")
_SHAPE_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")


def seeded(params: GenerationParams) -> GenerationParams:
    """`params` with a seed: its own, or a new random one when sampling is random and none was
    given (greedy decoding needs none: it is exact already)."""
    if params.seed is not None or params.temperature == 0:
        return params
    return params.model_copy(update={"seed": secrets.randbelow(2**32)})


def request_provenance(params: GenerationParams) -> dict[str, Any]:
    """The request's half: sampler settings and the seed that will be used."""
    values = params.model_dump(include=set(SAMPLER_FIELDS))
    values["logit_bias"] = {str(k): v for k, v in values["logit_bias"].items()}
    return {
        "sampler": values,
        "seed": params.seed,
        "greedy": params.temperature == 0,
        "tools": [tool.name for tool in params.tools] if params.uses_tools else [],
        "response_format": params.response_format.type if params.response_format else "text",
    }


def library_versions() -> dict[str, str]:
    """The installed versions of the libraries that compute replies."""
    versions = {}
    for package in ("mlx", "mlx-lm", "transformers"):
        try:
            versions[package.replace("-", "_")] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package.replace("-", "_")] = ""
    return versions


def template_hash(template: Any) -> str:
    """The SHA-256 of a chat template ("" for none); a dict of named templates hashes as JSON."""
    if not template:
        return ""
    if not isinstance(template, str):
        template = json.dumps(template, sort_keys=True, default=str)
    return hashlib.sha256(template.encode("utf-8")).hexdigest()


def _file_fingerprint(digest: Any, path: Path) -> None:
    size = path.stat().st_size
    digest.update(f"{path.name}\0{size}\0".encode())
    with path.open("rb") as f:
        digest.update(f.read(FINGERPRINT_SPAN))
        if size > 2 * FINGERPRINT_SPAN:
            f.seek(size - FINGERPRINT_SPAN)
            digest.update(f.read(FINGERPRINT_SPAN))
        elif size > FINGERPRINT_SPAN:
            digest.update(f.read())


def weights_fingerprint(path: Path) -> str:
    """A SHA-256 over each weights file's name, size and first and last MiB, and the small
    files that shape the model (config, tokenizer): cheap at any model size. "" if unreadable."""
    digest = hashlib.sha256()
    try:
        if path.is_file():
            _file_fingerprint(digest, path)
        else:
            files = sorted(
                p
                for p in path.iterdir()
                if p.is_file() and (p.suffix in _WEIGHT_SUFFIXES or p.name in _SHAPE_FILES)
            )
            if not files:
                return ""
            for file in files:
                _file_fingerprint(digest, file)
    except OSError as e:
        logger.warning("could not fingerprint %s: %s", path, e)
        return ""
    return digest.hexdigest()


def _quantization(config: dict[str, Any]) -> dict[str, Any]:
    """bits / group_size / mode from an mlx-lm config ("none" when not quantized); `mixed`
    when some layers have their own bits (GGUF imports, recipes)."""
    quant = config.get("quantization") or config.get("quantization_config")
    if not isinstance(quant, dict):
        return {"method": "none"}
    method = quant.get("mode") or quant.get("quant_method") or "affine"
    out: dict[str, Any] = {"method": str(method)}
    for key in ("bits", "group_size"):
        if isinstance(quant.get(key), int):
            out[key] = quant[key]
    layers = {(v.get("bits"), v.get("group_size")) for v in quant.values() if isinstance(v, dict)}
    if layers:
        out["mixed"] = sorted(f"{b}-bit/{g}" for b, g in layers if b is not None)
    return out


def _compute_dtype(model: Any) -> str:
    """The dtype the model computes in (the first floating parameter's; float32 when the
    engine cast the model on the CPU)."""
    try:
        import mlx.core as mx
        from mlx.utils import tree_flatten

        leaves: Any = tree_flatten(model.parameters())
        for _, value in leaves:
            if mx.issubdtype(value.dtype, mx.floating):
                return str(value.dtype).removeprefix("mlx.core.")
    except Exception:  # a model without parameters, a stub in tests
        pass
    return ""


def _device() -> str:
    try:
        import mlx.core as mx

        return str(mx.default_device())
    except Exception:
        return ""


def model_provenance(loaded: LoadedModel, converted_dir: Path) -> dict[str, Any]:
    """The loaded model's half (computed on the engine thread, once per loaded model)."""
    from inference.loader import converted_path
    from inference.weights.convert import read_provenance

    spec = loaded.spec
    source = spec.local_path()
    record: dict[str, Any] = {
        "model_id": spec.id,
        "model_name": spec.name,
        "kind": spec.kind,
        "revision": spec.revision or "",
        "hub_repo": spec.hub_repo or "",
        "context_length": loaded.context_length,
        "chat_template_sha256": template_hash(getattr(loaded.tokenizer, "chat_template", None)),
        "chat_template_overridden": bool(spec.chat_template),
        "compute_dtype": _compute_dtype(loaded.model),
        "device": _device(),
        "versions": library_versions(),
    }
    model_dir: Path | None = None
    if source is not None:
        record["source"] = source.name
        record["weights_fingerprint"] = weights_fingerprint(source)
        if spec.kind == "hub":
            # A snapshot folder is named by the commit it holds.
            record["revision"] = record["revision"] or source.name
        if spec.kind == "gguf":
            record["file_bytes"] = source.stat().st_size
            model_dir = converted_path(spec, converted_dir)
        else:
            model_dir = source
    config: dict[str, Any] = {}
    if model_dir is not None:
        try:
            config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            config = {}
        made_from = read_provenance(model_dir)
        if made_from:
            # What an import or conversion here recorded (mlxweb_source.json).
            record["made_from"] = {
                k: made_from[k]
                for k in ("kind", "path", "size_bytes", "mtime_ns", "recorded_at", "tag")
                if k in made_from
            }
    record["quantization"] = _quantization(config)
    record["architecture"] = str(config.get("model_type", ""))
    return record


# Alternatives kept per token of a traced reply, and the digits kept of each logprob.
TRACE_TOP_LOGPROBS = 5
_TRACE_DIGITS = 4


def _trace_token(entry: dict[str, Any]) -> dict[str, Any]:
    logprob = float(entry.get("logprob", 0.0))
    out: dict[str, Any] = {
        "token": str(entry.get("token", "")),
        # A token a grammar forbade has probability 0 (logprob -inf), which JSON cannot hold:
        # None says "impossible".
        "logprob": round(logprob, _TRACE_DIGITS) if math.isfinite(logprob) else None,
    }
    # A token that holds part of a UTF-8 character shows as U+FFFD; its bytes join with its
    # neighbours' into the real text, so they are kept (only for such tokens: they are rare).
    if "\ufffd" in out["token"] and entry.get("bytes"):
        out["bytes"] = list(entry["bytes"])
    return out


def trace_entry(entry: dict[str, Any]) -> dict[str, Any]:
    """One generated token as `Generation.token_trace` keeps it, from the engine's logprobs
    entry: {"token", "id", "logprob", "top": [{"token", "id", "logprob"}, ...]} (best first).
    The ids let a continuation go on from the very tokens (`generation_continue`)."""
    out = _trace_token(entry)
    if isinstance(entry.get("id"), int):
        out["id"] = entry["id"]
    ids = entry.get("top_ids") or []
    out["top"] = []
    for i, alt in enumerate(entry.get("top_logprobs") or []):
        top = _trace_token(alt)
        if top["logprob"] is None:
            continue  # not an alternative: the grammar forbade it
        if i < len(ids) and isinstance(ids[i], int):
            top["id"] = ids[i]
        out["top"].append(top)
    return out


def trace_text(entries: list[dict[str, Any]]) -> str:
    """The text of consecutive trace tokens (bytes joined, so split characters come whole)."""
    data = bytearray()
    for entry in entries:
        raw = entry.get("bytes")
        data += bytes(raw) if raw else str(entry.get("token", "")).encode("utf-8")
    return data.decode("utf-8", errors="replace")


# --- the exact prompt, rendered again on demand ----------------------------------------------
#
# Storing each reply's rendered prompt would make a long conversation's storage quadratic (every
# reply repeats all the turns before it). The prompt tree already holds each message once, the
# row holds how many turns were trimmed and how the reply was continued, and the provenance holds
# the template's hash: the web process renders the prompt again from the model folder's own
# tokenizer when someone opens it, and says so when the template changed since.


@dataclass(frozen=True)
class RenderedPrompt:
    """A reply's prompt as the engine rendered it, or why it cannot be shown."""

    text: str = ""
    problem: str = ""
    # The chat template is not the one the reply was written with (its hash differs).
    template_changed: bool = False
    raw: bool = False  # a completion prompt, sent without a template
    messages: int = 0
    trimmed: int = 0


_tokenizers: dict[tuple[str, int], Any] = {}
_tokenizers_lock = threading.Lock()
MAX_CACHED_TOKENIZERS = 4


def _tokenizer_for(folder: Path, template_override: str | None) -> Any:
    """The folder's tokenizer (transformers, no weights), cached by folder and modification
    time."""
    from transformers import AutoTokenizer

    config = folder / "tokenizer_config.json"
    key = (f"{folder.resolve()}\0{template_override or ''}", config.stat().st_mtime_ns)
    with _tokenizers_lock:
        tokenizer = _tokenizers.get(key)
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        if template_override:
            tokenizer.chat_template = template_override
        with _tokenizers_lock:
            if len(_tokenizers) >= MAX_CACHED_TOKENIZERS:
                _tokenizers.pop(next(iter(_tokenizers)))
            _tokenizers[key] = tokenizer
    return tokenizer


def _tokenizer_folder(model_id: str) -> tuple[Path | None, str | None, str]:
    """(the folder holding the model's tokenizer, its chat template override, the problem)."""
    from django.conf import settings

    from inference.catalogue import UnknownModel, get_catalogue
    from inference.loader import converted_path

    try:
        spec = get_catalogue().get(model_id)
    except UnknownModel:
        return None, None, f"the model {model_id!r} is no longer in the catalogue"
    source = spec.local_path()
    if source is None:
        return None, None, f"the model {model_id!r} is not on this machine any more"
    folder = source
    if spec.kind == "gguf":
        folder = converted_path(spec, settings.MLXWEB_CONVERTED_DIR)
    base = getattr(spec, "base_id", None)
    if not (folder / "tokenizer_config.json").is_file() and base:
        return _tokenizer_folder(str(base))  # a LoRA adapter: its base model's tokenizer
    if not (folder / "tokenizer_config.json").is_file():
        return None, None, "the model's tokenizer files are not on this machine (not loaded yet)"
    return folder, spec.chat_template, ""


def rendered_prompt(generation: Any) -> RenderedPrompt:
    """The exact text the engine tokenized for `generation` (a `Generation`): its prompt
    messages through the same message shaping and chat template, less the turns the engine
    trimmed to fit the context, plus a continued reply's prefix."""
    from inference.engine import (
        _template_knows,
        _template_messages,
        _template_renders_tools,
    )

    messages = generation.prompt_messages()
    if len(messages) == 1 and messages[0]["role"] == "raw":
        return RenderedPrompt(text=messages[0]["content"], raw=True, messages=1)
    folder, override, problem = _tokenizer_folder(generation.model_id)
    if folder is None:
        return RenderedPrompt(problem=problem, messages=len(messages))
    try:
        tokenizer = _tokenizer_for(folder, override)
    except (OSError, ValueError) as e:
        return RenderedPrompt(problem=f"the tokenizer cannot be read: {e}", messages=len(messages))
    params = GenerationParams.model_validate(generation.params or {})
    tools = [t.as_template_tool() for t in params.tools] if params.uses_tools else []
    native = bool(tools) and _template_renders_tools(tokenizer)
    shaped = _template_messages(
        messages,
        tools=tools,
        native_tools=native,
        developer=_template_knows(tokenizer, "developer"),
    )
    system = shaped[:1] if shaped and shaped[0].get("role") == "system" else []
    turns = shaped[len(system) :][generation.trimmed_messages :]
    details = generation.details or {}
    prefix = generation.text[: int(details.get("prefix_chars") or 0)]
    try:
        if getattr(tokenizer, "chat_template", None):
            kwargs: dict[str, Any] = {"tools": tools} if native else {}
            text = tokenizer.apply_chat_template(
                system + turns, add_generation_prompt=True, tokenize=False, **kwargs
            )
        else:
            text = "".join(f"{m['role']}: {m['content']}\n" for m in system + turns)
            text += "assistant:"
    except Exception as e:  # a template that raises on these messages (jinja's own errors)
        return RenderedPrompt(problem=f"the chat template failed: {e}", messages=len(messages))
    recorded = (generation.provenance or {}).get("chat_template_sha256")
    changed = bool(recorded) and recorded != template_hash(
        getattr(tokenizer, "chat_template", None)
    )
    return RenderedPrompt(
        text=str(text) + prefix,
        template_changed=changed,
        messages=len(messages),
        trimmed=generation.trimmed_messages,
    )
