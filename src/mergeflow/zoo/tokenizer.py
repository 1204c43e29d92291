"""A character-level tokenizer for the toy zoo.

One token per character keeps multi-digit arithmetic and string reversal learnable by a model of
a few hundred thousand parameters; it is built with the `tokenizers` library and saved as a normal
`PreTrainedTokenizerFast`, so `AutoTokenizer.from_pretrained` loads it like any hub tokenizer.
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]
CHARACTERS = string.digits + string.ascii_lowercase + string.ascii_uppercase + " \n+-*/=()[],.:;?!'\"|<>_#"


def build_tokenizer(model_max_length: int) -> PreTrainedTokenizerFast:
    """Return the toy zoo's tokenizer: fixed vocabulary, so the same ids on every machine."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + list(CHARACTERS))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="left",
        model_max_length=model_max_length,
    )
