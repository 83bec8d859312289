"""EditRequest: one fact to rewrite. Frozen and validated on construction."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from .errors import RequestError


@dataclass(frozen=True)
class EditRequest:
    """Rewrite "``prompt.format(subject)`` → ``target_new``".

    ``prompt`` holds exactly one ``{}`` where the subject goes, e.g. ``"{} is located in"``.
    Targets are stored as the user wrote them, without a leading space; the tokenizer-specific
    spacing is decided when the edit is computed (see ``rompatch.tokens``).
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    relation_id: str | None = None
    case_id: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or self.prompt.count("{}") != 1:
            raise RequestError(
                f"prompt {self.prompt!r} must contain exactly one '{{}}' where the subject goes, "
                "e.g. '{} is located in'"
            )
        if not isinstance(self.subject, str) or not self.subject.strip():
            raise RequestError(
                "subject is empty; pass the entity whose fact changes, e.g. 'The Eiffel Tower'"
            )
        if not isinstance(self.target_new, str) or not self.target_new.strip():
            raise RequestError("target_new is empty; pass the new object of the fact, e.g. 'Rome'")
        if self.target_true is not None and not self.target_true.strip():
            raise RequestError("target_true is empty; leave it out or pass the current object, e.g. 'Paris'")
        # Normalise: targets never carry the leading space (tokenizer handling adds it).
        object.__setattr__(self, "target_new", self.target_new.strip())
        if self.target_true is not None:
            object.__setattr__(self, "target_true", self.target_true.strip())

    @property
    def text(self) -> str:
        """The prompt with the subject filled in."""
        return self.prompt.format(self.subject)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EditRequest:
        """Accepts the flat shape ({prompt, subject, target_new, ...}), the CounterFact record
        shape ({case_id, requested_rewrite: {...}}) and CounterFact's ``requested_rewrite`` itself
        (targets as ``{"str": ...}``)."""
        if not isinstance(d, Mapping):
            raise RequestError(f"request must be a JSON object, got {type(d).__name__}")
        case_id = d.get("case_id")
        if "requested_rewrite" in d:
            d = d["requested_rewrite"]

        def _target(key: str, alt: str) -> str | None:
            t = d.get(key, d.get(alt))
            if isinstance(t, Mapping):
                t = t.get("str")
            return t

        missing = [k for k in ("prompt", "subject") if k not in d]
        if _target("target_new", "target") is None:
            missing.append("target_new")
        if missing:
            raise RequestError(
                f"request is missing {', '.join(missing)}; expected keys prompt, subject, target_new "
                "(and optionally target_true), or a CounterFact record"
            )
        return cls(
            prompt=d["prompt"],
            subject=d["subject"],
            target_new=_target("target_new", "target"),
            target_true=_target("target_true", "ground_truth"),
            relation_id=d.get("relation_id"),
            case_id=None if case_id is None else str(case_id),
        )


def load_requests(path: str) -> list[EditRequest]:
    """Read requests from a JSON list/object or a JSONL file (flat or CounterFact shape)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise RequestError(f"cannot read requests file {path}: {e.strerror}") from e
    text = text.strip()
    if not text:
        raise RequestError(f"requests file {path} is empty; give a JSON list or JSONL of requests")
    try:
        if text[0] == "[":
            items = json.loads(text)
        elif text[0] == "{" and "\n" in text and text.count("\n{") >= 1:
            items = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            obj = json.loads(text)
            items = obj if isinstance(obj, list) else [obj]
    except json.JSONDecodeError as e:
        raise RequestError(
            f"requests file {path} is not valid JSON/JSONL ({e.msg} at line {e.lineno})"
        ) from e
    out = []
    for i, item in enumerate(items):
        try:
            out.append(EditRequest.from_dict(item))
        except RequestError as e:
            raise RequestError(f"{path}: request {i}: {e}") from e
    return out
