"""Tiny random models saved to a folder, as transformers' own tests build them: causal LMs
and a ViT image encoder.

No weights are downloaded: the config is written by hand, the weights are random with a
fixed seed, and the tokenizer is a byte-level BPE trained in well under a second on a
fixed text, with a chat template string set by hand. The ViT is saved with its image
processor (what `capaserve serve --model` reads to prepare pixels).
"""

from __future__ import annotations

from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, this is a tiny language model for tests",
    "capaboost adapters are merged into the base weights",
    "user assistant system message content reply answer question",
] * 20


def build_tokenizer(folder: Path):
    """Train a byte-level BPE tokenizer offline and save it as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|pad|>", "<|bos|>", "<|eos|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    return fast


def build_tiny_causal_lm(folder: Path, arch: str = "llama", seed: int = 0) -> Path:
    """Save a tiny random Llama, GPT-2 or Mistral (with its tokenizer) to `folder` and return it."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(folder)
    vocab = len(tok)
    if arch == "llama":
        config = LlamaConfig(
            vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        )
    elif arch == "gpt2":
        config = GPT2Config(
            vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=256,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        )
    elif arch == "mistral":  # sliding-window attention: its KV cache layers are sliding ones
        config = MistralConfig(
            vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, sliding_window=48,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        )
    else:
        raise ValueError(f"unknown arch {arch!r}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    return folder


def build_tiny_vit(folder: Path, seed: int = 0, image_size: int = 32, patch_size: int = 8) -> Path:
    """Save a tiny random ViTModel (hidden 32, 2 layers; (image_size/patch_size)^2 + 1 tokens)
    and a ViTImageProcessor resizing to image_size x image_size to `folder`; return it."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        image_size=image_size, patch_size=patch_size, num_channels=3,
    )
    torch.manual_seed(seed)
    ViTModel(config).save_pretrained(folder)
    ViTImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(folder)
    return folder
