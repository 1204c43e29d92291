"""Tiny random encoder-decoders (T5 laid out as Flan-T5: gated-GELU feed-forward, untied output
layer) with a byte-level BPE tokenizer, which every model type reloads faithfully (a word-level
one is reloaded as the model type's own tokenizer class and loses most words)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

from helpers import save_with_random_norms

CORPUS = [
    "the quick brown fox jumps over the lazy dog. Question: Answer: Summary: Article: yes no true false",
    "Anna went to the shop because she needed milk. She paid and walked home. 0123456789 + - = ?",
]


def byte_level_tokenizer(model_max_length: int = 64) -> PreTrainedTokenizerFast:
    """BPE over bytes (pad 0, eos 1, unk 2 as in T5), `</s>` appended to every encoded text."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(CORPUS, trainer)
    eos = backend.token_to_id("</s>")
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", eos)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=model_max_length)


def make_tiny_t5(path: Path, seed: int, *, d_model: int = 16, layers: int = 2, d_ff: int = 24) -> Path:
    torch.manual_seed(seed)
    tokenizer = byte_level_tokenizer()
    config = T5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_kv=4, d_ff=d_ff, num_layers=layers, num_decoder_layers=layers, num_heads=4,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, n_positions=64,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id,
    )
    return save_with_random_norms(T5ForConditionalGeneration(config), tokenizer, path, "layer_norm")


def make_t5_lora(base: Path, out: Path, rank: int, alpha: int, seed: int) -> Path:
    """A LoRA adapter on q and v (as the lorahub Flan-T5 experts) with random, non-zero A and B."""
    from test_adapters import make_lora

    return make_lora(base, out, rank, alpha, seed, seq2seq=True)


def make_tiny_bart(path: Path, seed: int) -> Path:
    """BART: learnt absolute positions, biases, the decoder starting from eos."""
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(seed)
    tokenizer = byte_level_tokenizer()
    config = BartConfig(
        vocab_size=len(tokenizer), d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=24, decoder_ffn_dim=24, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.eos_token_id,
    )
    BartForConditionalGeneration(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
