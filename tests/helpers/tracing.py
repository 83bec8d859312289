"""Shared by the tracing tests: tiny models that give sharp predictions, the Eiffel Tower prompt and
facts a tiny model 'knows'."""

from __future__ import annotations

import torch

from rompatch.tracing.known_facts import predicts_attribute
from tests.helpers.tiny import make_model

PROMPT = "The Eiffel Tower is located in the city of"
SUBJECT = "The Eiffel Tower"

CANDIDATES = [
    ("The Eiffel Tower is located in the city of", "The Eiffel Tower"),
    ("Beats Music is owned by", "Beats Music"),
    ("The mother tongue of Danielle Darrieux is", "Danielle Darrieux"),
    ("Michael Jordan plays the sport of", "Michael Jordan"),
    ("Toko Yasuda plays the", "Toko Yasuda"),
    ("The Space Needle is located in", "The Space Needle"),
    ("Apple was founded by", "Apple"),
    ("Vinson Massif is located in the continent of", "Vinson Massif"),
    ("The capital of Japan is", "Japan"),
    ("Lionel Messi plays", "Lionel Messi"),
    ("Miles Davis played the", "Miles Davis"),
    ("Audible.com is owned by", "Audible.com"),
]


def tiny(arch: str = "llama"):
    # A larger init than the default 0.02 gives sharp predictions, so restorations matter.
    return make_model(arch, initializer_range=0.3)


def known_records(model, tok, n=3):
    """Facts the tiny model 'knows': the attribute is its own greedy prediction."""
    recs = []
    for p, s in CANDIDATES:
        with torch.no_grad():
            nxt = int(model(torch.tensor([tok(p)["input_ids"]])).logits[0, -1].argmax())
        attr = tok.decode([nxt]).strip()
        if attr and predicts_attribute(model, tok, p, attr):
            recs.append({"known_id": len(recs), "subject": s, "attribute": attr, "prompt": p})
    assert len(recs) >= n, "the tiny model should 'know' enough of the candidate facts"
    return recs[:n]
