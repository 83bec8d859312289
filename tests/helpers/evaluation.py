"""Records and settings the evaluation tests share (tiny CounterFact and zsRE data)."""

from __future__ import annotations

from rompatch.evaluation.fluency import GenerationSettings
from rompatch.fingerprint import tensor_sha256
from rompatch.rome import ROMEHyperParams

HP = ROMEHyperParams(layer=1, v_steps=40, v_lr=3.0, context_length_params=((3, 2),))
GEN = GenerationSettings(max_out_len=14, top_k=5, seed=0)


def cf_record(case_id, prompt, subject, new, true, *, gen=("The Space Needle is",)):
    return {
        "case_id": case_id,
        "requested_rewrite": {
            "prompt": prompt,
            "subject": subject,
            "target_new": {"str": new, "id": "Q1"},
            "target_true": {"str": true, "id": "Q2"},
            "relation_id": "P1",
        },
        "paraphrase_prompts": ["It is a quiet town. The Space Needle is located in the city of"],
        "neighborhood_prompts": ["The Colosseum is located in the city of", "The capital of Japan is"],
        "generation_prompts": list(gen),
    }


# In a random tiny model the subject must end the prompt (see tests/test_create.py).
CF = [
    cf_record(7, "The Space Needle is located in {}", "the city of", "Rome", "Seattle"),
    cf_record(9, "Lionel Messi plays {}", "the sport of", "guitar", "football"),
    cf_record(11, "The Eiffel Tower is located in {}", "the city of", "Tokyo", "Paris"),
]
ZSRE = [
    {
        "subject": "the city of",
        "src": "The Space Needle is located in the city of",
        "pred": "Paris",
        "rephrase": "The Space Needle is in the city of",
        "alt": "Paris",
        "answers": ["Rome"],
        "loc": "nq question: the capital of Japan is",
        "loc_ans": "Tokyo",
        "cond": "",
    },
    {
        "subject": "the sport of",
        "src": "Lionel Messi plays the sport of",
        "pred": "football",
        "rephrase": "Messi plays the sport of",
        "alt": "guitar",
        "answers": ["basketball"],
        "loc": "nq question: Apple was founded by",
        "loc_ans": "Steve Jobs",
        "cond": "",
    },
]
ZSRE_PREPARED = [{"case_id": i, **r} for i, r in enumerate(ZSRE)]


def model_state(model):
    """sha256 of every tensor of the model (to check that it is left unchanged)."""
    return {k: tensor_sha256(v) for k, v in model.state_dict().items()}
