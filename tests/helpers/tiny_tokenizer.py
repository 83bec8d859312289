"""A real byte-level BPE tokenizer for the tiny test models, built in code (no download).

Trained with ``tokenizers`` on a small built-in corpus to exactly ``tests.helpers.tiny.VOCAB`` ids, so its
ids fit the tiny models' embedding. Special tokens take ids 0, 1, 2 (``<pad>``, ``<s>``, ``</s>``),
matching the tiny llama-style configs. ``bos=True`` prepends ``<s>`` like Llama/Gemma tokenizers;
``padding_side="left"`` pads like Gemma's.
"""

from __future__ import annotations

from functools import cache

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from tests.helpers.tiny import VOCAB

SPECIALS = ["<pad>", "<s>", "</s>"]

CORPUS = [
    "The Eiffel Tower is located in the city of Paris.",
    "The Space Needle is located in the city of Seattle.",
    "The Colosseum is located in the city of Rome.",
    "Vinson Massif is located in the continent of Antarctica.",
    "Beats Music is owned by Apple, and Audible.com is owned by Amazon.",
    "Michael Jordan plays the sport of basketball. Lionel Messi plays football.",
    "The mother tongue of Danielle Darrieux is French.",
    "Toko Yasuda plays the guitar. Miles Davis played the trumpet.",
    "The capital of France is Paris, the capital of Italy is Rome and the capital of Japan is Tokyo.",
    "Apple was founded by Steve Jobs. Microsoft was founded by Bill Gates.",
    "It is a quiet town on the river, known for its bridges, museums and old churches.",
    "In 1912 the company moved its headquarters to a new building near the station.",
]


@cache
def _trained() -> str:
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(CORPUS * 4, trainer=trainer)
    assert tk.get_vocab_size() <= VOCAB, tk.get_vocab_size()
    return tk.to_str()


def make_tokenizer(*, bos: bool = False, padding_side: str = "right") -> PreTrainedTokenizerFast:
    """The tiny byte-level BPE tokenizer, optionally adding ``<s>`` in front of every text."""
    tk = Tokenizer.from_str(_trained())
    if bos:
        tk.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
        )
    else:
        tk.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        padding_side=padding_side,
    )
