"""A tiny llama in Hugging Face format (safetensors, a BPE tokenizer), built in memory: what the
fake hub serves and what the convert, quantize and validate tests start from."""

from __future__ import annotations

import json
from typing import Any

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SENTENCES = [
    "The capital of France is Paris.",
    "A tiny model writes tiny words, one token at a time.",
    "Hello! How are you today? I am fine, thank you.",
    "MLX runs language models on Apple silicon and on Linux CPUs.",
]


def tiny_hf_model_files(*, seed: int = 0) -> dict[str, bytes]:
    """A small llama in Hugging Face format: config, float16 safetensors, a BPE tokenizer."""
    import numpy as np
    from safetensors.numpy import save
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    special = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(SENTENCES * 4, trainer=trainer)
    vocab = tokenizer.get_vocab_size()

    hidden, inter, layers, heads, kv_heads = 128, 256, 2, 4, 2
    head_dim = hidden // heads
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 2048,
        "vocab_size": vocab,
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        "bos_token_id": tokenizer.token_to_id("<s>"),
        "eos_token_id": tokenizer.token_to_id("<|im_end|>"),
    }
    rng = np.random.default_rng(seed)

    def weight(*shape: int) -> Any:
        return (rng.standard_normal(shape) * 0.05).astype(np.float16)

    tensors = {
        "model.embed_tokens.weight": weight(vocab, hidden),
        "model.norm.weight": np.ones(hidden, dtype=np.float16),
        "lm_head.weight": weight(vocab, hidden),
    }
    for i in range(layers):
        p = f"model.layers.{i}"
        tensors.update(
            {
                f"{p}.self_attn.q_proj.weight": weight(heads * head_dim, hidden),
                f"{p}.self_attn.k_proj.weight": weight(kv_heads * head_dim, hidden),
                f"{p}.self_attn.v_proj.weight": weight(kv_heads * head_dim, hidden),
                f"{p}.self_attn.o_proj.weight": weight(hidden, heads * head_dim),
                f"{p}.mlp.gate_proj.weight": weight(inter, hidden),
                f"{p}.mlp.up_proj.weight": weight(inter, hidden),
                f"{p}.mlp.down_proj.weight": weight(hidden, inter),
                f"{p}.input_layernorm.weight": np.ones(hidden, dtype=np.float16),
                f"{p}.post_attention_layernorm.weight": np.ones(hidden, dtype=np.float16),
            }
        )
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "<|im_end|>",
        "unk_token": "<unk>",
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": 2048,
    }
    return {
        "config.json": json.dumps(config, indent=2).encode(),
        "model.safetensors": save(tensors, metadata={"format": "pt"}),
        "tokenizer.json": tokenizer.to_str().encode(),
        "tokenizer_config.json": json.dumps(tokenizer_config, indent=2).encode(),
        "generation_config.json": json.dumps({"eos_token_id": config["eos_token_id"]}).encode(),
    }
