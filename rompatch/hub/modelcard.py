"""The README.md model card that ``rompatch push`` writes next to the patch files.

YAML front matter (what the Hub indexes)::

    base_model: <the base's Hub id>        # an embedded alias maps to its upstream id
    base_model_relation: adapter
    library_name: rompatch
    tags: [rompatch, rome, model-editing]

Body: a table of the edits (subject, prompt, old → new, layer), the metrics recorded at creation
(P(new) and P(true) before → after first), attached audits and signatures (signer and key id,
``rompatch.signing``) when the files carry them, each patch's id and lineage, and copy-paste install
instructions (from the repository, ``PROJECT_URL``: rompatch is not on a package index) and usage
for the CLI and for Python.

The generated part of the body sits between ``<!-- rompatch:begin -->`` and ``<!-- rompatch:end -->``.
Re-rendering over an existing README replaces only that part: text the owner wrote outside the
markers and front-matter keys rompatch does not manage (license, language, ...) are kept.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import yaml

from ..constants import PROJECT_URL
from ..models import EMBEDDED
from ..signing import signature_info

if TYPE_CHECKING:
    from ..patch import Patch

log = logging.getLogger(__name__)

LIBRARY_NAME = "rompatch"
CARD_TAGS = ("rompatch", "rome", "model-editing")
BEGIN = "<!-- rompatch:begin -->"
END = "<!-- rompatch:end -->"
_YAML_BLOCK = re.compile(r"^(\s*---(?:\r\n|\r|\n))([\S\s]*?)((?:\r\n|\r|\n)---[ \t]*(\r\n|\n|$))")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_MAX_METRIC_COLUMNS = 8
# Shown first in "Metrics at creation", as "before → after" (the keys create_patch records).
_PROBABILITY_METRICS = (
    ("P(new)", "p_new_before", "p_new_after"),
    ("P(true)", "p_true_before", "p_true_after"),
)


def hub_model_id(name: str | None) -> str | None:
    """The Hub id for a patch's recorded base model, or ``None`` when it is a local path.

    Embedded aliases (``smollm2-135m``) map to the upstream model they were converted from.
    """

    if not name:
        return None
    if name in EMBEDDED:
        return EMBEDDED[name].hf_id
    if os.path.isabs(name) or name.startswith((".", "~")) or os.path.exists(name):
        return None
    if not _HUB_ID.match(name) or "--" in name or ".." in name or name.endswith((".", "-")):
        return None
    return name


def _cell(x: Any) -> str:
    s = "" if x is None else str(x)
    return s.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ").replace("\r", " ")


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:.4g}"
    return _cell(v)


def ordered(entries: Sequence[tuple[str, Patch]]) -> list[tuple[str, Patch]]:
    """Stable order in which every patch comes after the patches of its lineage (when present)."""
    by_id = {p.id: (f, p) for f, p in entries}
    out: list[tuple[str, Patch]] = []
    done: set[str] = set()

    def visit(f: str, p: Patch, stack: tuple[str, ...]) -> None:
        if p.id in done or p.id in stack:
            return
        for parent in p.lineage:
            if parent in by_id:
                visit(*by_id[parent], stack + (p.id,))
        done.add(p.id)
        out.append((f, p))

    for f, p in entries:
        visit(f, p, ())
    return out


def card_metadata(
    entries: Sequence[tuple[str, Patch]], *, base_model: str | Sequence[str] | None = None
) -> dict:
    """The front matter rompatch manages (base_model omitted when no Hub id is known)."""
    if base_model is None:
        ids: list[str] = []
        for _, p in entries:
            hid = hub_model_id(p.base.get("model"))
            if hid and hid not in ids:
                ids.append(hid)
        bm: str | list[str] | None = ids[0] if len(ids) == 1 else (ids or None)
    else:
        bm = base_model if isinstance(base_model, str) else list(base_model)
    meta: dict[str, Any] = {}
    if bm:
        meta["base_model"] = bm
    meta["base_model_relation"] = "adapter"
    meta["library_name"] = LIBRARY_NAME
    meta["tags"] = list(CARD_TAGS)
    return meta


def render_body(entries: Sequence[tuple[str, Patch]], *, repo_id: str) -> str:
    """The generated Markdown body (between the rompatch markers): intro, edits, metrics, patches, usage."""
    entries = ordered(entries)
    bases = list(dict.fromkeys(p.base.get("model", "unknown") for _, p in entries))
    lines = [BEGIN, f"# {repo_id}", ""]
    lines += _intro(entries, bases)
    lines += _edits_table(entries)
    lines += _metrics_table(entries)
    lines += _audit_section(entries)
    lines += _signature_section(entries)
    lines += _patches_table(entries)
    lines += _usage(entries, bases, repo_id)
    lines.append(END)
    return "\n".join(lines) + "\n"


def _intro(entries: Sequence[tuple[str, Patch]], bases: list[str]) -> list[str]:
    base_txt = ", ".join(_base_link(b) for b in bases)
    n_edits = sum(len(p.deltas) for _, p in entries)
    lines = [
        f"{n_edits} fact edit{'s' if n_edits != 1 else ''} of {base_txt}, as "
        f"[rompatch]({PROJECT_URL}) patch file{'s' if len(entries) != 1 else ''}: "
        "rank-one updates (ROME, Meng et al. 2022) to MLP output matrices, with their provenance. "
        "A patch is applied to the base model's weights at load time and checked against the base "
        "tensors' sha256 fingerprints, so it is never applied to the wrong weights by accident.",
        "",
    ]
    for b in bases:
        if b in EMBEDDED:
            lines += [
                f"The base `{b}` is rompatch's embedded model: {EMBEDDED[b].hf_id} as shipped in GGUF "
                f"({EMBEDDED[b].gguf_name}) and de-quantised to float32 by rompatch. Load it by that alias; the "
                "patch's fingerprints are for those weights.",
                "",
            ]
    return lines


def _edits_table(entries: Sequence[tuple[str, Patch]]) -> list[str]:
    lines = [
        "## Edits",
        "",
        "| file | subject | prompt | old → new | layer | statistics |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for f, p in entries:
        for d in p.deltas:
            r = d.request
            st = _cell(d.stats_label() or "—")
            if r is None:
                lines.append(
                    f"| {_cell(f)} | — | ({_cell(d.kind)}, no request recorded) | — | {d.layer} | {st} |"
                )
            else:
                old = r.target_true if r.target_true is not None else "?"
                lines.append(
                    f"| {_cell(f)} | {_cell(r.subject)} | {_cell(r.prompt)} | "
                    f"{_cell(old)} → {_cell(r.target_new)} | {d.layer} | {st} |"
                )
    return lines + [""]


def _metrics_table(entries: Sequence[tuple[str, Patch]]) -> list[str]:
    columns = _metric_columns([d for _, p in entries for d in p.deltas])
    lines = ["## Metrics at creation", ""]
    if not columns:
        return lines + ["No metrics were recorded when these patches were created.", ""]
    shown = columns[:_MAX_METRIC_COLUMNS]
    lines += [
        "| file | subject | " + " | ".join(_cell(title) for title, _ in shown) + " |",
        "| --- | --- | " + " | ".join("---" for _ in shown) + " |",
    ]
    for f, p in entries:
        for d in p.deltas:
            subj = d.request.subject if d.request else f"delta on layer {d.layer}"
            vals = " | ".join(value(d.metrics) for _, value in shown)
            lines.append(f"| {_cell(f)} | {_cell(subj)} | {vals} |")
    if len(columns) > len(shown):
        more = ", ".join(title for title, _ in columns[len(shown) :])
        lines += ["", f"More metrics ({more}): `rompatch show FILE --json`."]
    return lines + [""]


def _audit_section(entries: Sequence[tuple[str, Patch]]) -> list[str]:
    """The audits the files carry (``rompatch audit --attach`` or ``push --audit``); none: nothing."""
    audits = [(f, p, _own_audit(p)) for f, p in entries]
    if not any(a for _, _, a in audits):
        return []
    lines = [
        "## Audit",
        "",
        "What each patch changes beyond its own fact (`rompatch audit`): the share of text tokens it "
        "reaches, other subjects that now answer its target, the subject's other answers it keeps, and "
        "perplexity.",
        "",
        "| file | verdict | efficacy | leaks | subject keeps | tokens firing | perplexity | text |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for f, _, a in audits:
        if a is None:
            lines.append(f"| {_cell(f)} | not audited | | | | | | |")
            continue
        s = a["summary"]
        eff = "—" if s["efficacy"] is None else f"{s['efficacy']:.0%}"
        kept = "—" if s["kept"] is None else f"{s['kept']:.0%}"
        text = f"{a['tokens']:,} tokens of {a['corpus']}"
        lines.append(
            f"| {_cell(f)} | {s['verdict']} | {eff} | {s['leaks']}/{s['leak_probes']} | {kept} | "
            f"{s['firing']:.3%} at reach ≥ {s['firing_at']} | {s['ppl_increase_percent']:+.2f}% | "
            f"{_cell(text)} |"
        )
    reasons = [(f, r) for f, _, a in audits if a is not None for r in a["summary"]["reasons"]]
    if reasons:
        lines += ["", *[f"- {_cell(f)}: {_cell(r)}" for f, r in reasons]]
    return lines + [""]


def _own_audit(p: Patch) -> dict[str, Any] | None:
    """The audit ``p``'s file carries when it is of ``p`` (an audit of another patch is not shown)."""
    a = p.audit()
    if a and a.get("patch_id") != p.id:
        log.warning(
            "patch %s carries an audit of another patch (%s); not shown", p.short_id, a.get("patch_id")
        )
        return None
    return a


def _signature_section(entries: Sequence[tuple[str, Patch]]) -> list[str]:
    """Who signed each patch (``rompatch sign``), as the files claim; none signed: nothing."""
    infos = [(f, signature_info(p)) for f, p in entries]
    if not any(i for _, i in infos):
        return []
    lines = [
        "## Signatures",
        "",
        "| file | signer | key id | signature |",
        "| --- | --- | --- | --- |",
    ]
    for f, i in infos:
        if i is None:
            lines.append(f"| {_cell(f)} | not signed | | |")
            continue
        kid = f"`{i['key_id']}`" if i["key_id"] else "—"
        state = {True: "verifies for this patch", False: "INVALID", None: "not checked"}[i["verifies"]]
        lines.append(f"| {_cell(f)} | {_cell(i['signer'] or '—')} | {kid} | {state} |")
    lines += [
        "",
        "A signature proves that the holder of the key signed exactly this patch, not who that is: get the "
        "signer's public key from them, not from this page, and check with "
        "`rompatch verify FILE --key SIGNER.pub` (or `rompatch apply --require-signature SIGNER.pub`).",
        "",
    ]
    return lines


def _patches_table(entries: Sequence[tuple[str, Patch]]) -> list[str]:
    lines = [
        "## Patches",
        "",
        "| file | patch id | lineage | base | deltas | created |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for f, p in entries:
        lineage = ", ".join(f"`{x[:12]}`" for x in p.lineage) or "none (computed on the base model)"
        base = f"{p.base.get('model')} ({p.base.get('model_type')}, {p.base.get('dtype')})"
        lines.append(
            f"| {_cell(f)} | `{p.id}` | {lineage} | {_cell(base)} | {len(p.deltas)} | {_cell(p.created_at or '')} |"
        )
    lines.append("")
    if any(p.lineage for _, p in entries):
        lines += [
            "A patch with a lineage was computed on top of those patches: apply them first, in the order "
            "listed (the usage below does).",
            "",
        ]
    return lines


def _usage(entries: Sequence[tuple[str, Patch]], bases: list[str], repo_id: str) -> list[str]:
    refs = [f"{repo_id}/{f}" for f, _ in entries]
    base0 = bases[0] if len(bases) == 1 else "BASE_MODEL"
    first_req = next((d.request for _, p in entries for d in p.deltas if d.request is not None), None)
    prompt = first_req.text if first_req is not None else "YOUR PROMPT"
    patch_flags = " ".join(f"--patch {r}" for r in refs)
    return [
        "## Usage",
        "",
        "rompatch is not released on a package index; install it from its repository:",
        "",
        "```bash",
        f'pip install "rompatch @ git+{PROJECT_URL}"',
        "# or, from a checkout of the repository:",
        "pip install -e .",
        "```",
        "",
        "Command line:",
        "",
        "```bash",
        f"rompatch pull {refs[0]}        # download; prints the local path",
        f"rompatch show {refs[0]}        # what it changes",
        f"rompatch predict {base0} {patch_flags} --prompt {_shell_quote(prompt)}",
        f"rompatch export-peft {' '.join(refs)} -o adapter/   # as a PEFT LoRA adapter",
        "```",
        "",
        "Python:",
        "",
        "```python",
        "from rompatch import load_patched",
        "from rompatch.predict import greedy",
        "",
        f"model, tok = load_patched({base0!r}, {refs if len(refs) > 1 else refs[0]!r})",
        f"print(greedy(model, tok, {prompt!r}))",
        "```",
        "",
        "`load_patched` downloads the patches into the Hugging Face cache, applies them in order and checks "
        "every edited tensor. It works offline (`HF_HUB_OFFLINE=1`) once the files are cached.",
    ]


def _metric_columns(deltas: Sequence[Any]) -> list[tuple[str, Callable[[Mapping[str, Any]], str]]]:
    """``(title, cell)`` of each metric column: P(new) and P(true) before → after first, then every
    other metric in the order first recorded."""

    def single(key: str) -> Callable[[Mapping[str, Any]], str]:
        return lambda m: _fmt(m[key]) if key in m else ""

    def before_after(before: str, after: str) -> Callable[[Mapping[str, Any]], str]:
        def cell(m: Mapping[str, Any]) -> str:
            if before not in m and after not in m:
                return ""
            return f"{_fmt(m[before]) if before in m else '?'} → {_fmt(m[after]) if after in m else '?'}"

        return cell

    seen: list[str] = []
    for d in deltas:
        seen += [k for k in d.metrics if k not in seen]
    paired = {k for _, before, after in _PROBABILITY_METRICS for k in (before, after)}
    columns = [
        (f"{title} before → after", before_after(before, after))
        for title, before, after in _PROBABILITY_METRICS
        if before in seen or after in seen
    ]
    return columns + [(k, single(k)) for k in seen if k not in paired]


def _base_link(b: str) -> str:
    hid = hub_model_id(b)
    if hid is None:
        return f"`{b}`"

    label = f"`{b}`" if b in EMBEDDED else hid
    return (
        f"{label} ([{hid}](https://huggingface.co/{hid}))"
        if b in EMBEDDED
        else f"[{label}](https://huggingface.co/{hid})"
    )


def _shell_quote(s: str) -> str:
    import shlex

    return shlex.quote(s)


def split_front_matter(text: str) -> tuple[dict | None, str]:
    """``(metadata or None, body)`` of a README. Invalid YAML gives ``None`` (with a warning)."""
    m = _YAML_BLOCK.search(text)
    if not m:
        return None, text
    try:
        data = yaml.safe_load(m.group(2))
    except yaml.YAMLError as e:
        log.warning("the existing README's YAML front matter is invalid (%s); it is replaced", e)
        return None, text[m.end() :]
    if data is None:
        data = {}
    if not isinstance(data, dict):
        log.warning("the existing README's front matter is not a mapping; it is replaced")
        return None, text[m.end() :]
    return data, text[m.end() :]


def render_card(
    entries: Sequence[tuple[str, Patch]],
    *,
    repo_id: str,
    existing: str | None = None,
    base_model: str | Sequence[str] | None = None,
) -> str:
    """The full README.md for a repo holding ``entries`` = ``[(path_in_repo, Patch), ...]``.

    ``existing``: the repo's current README, whose own text and other front-matter keys are kept.
    """
    if not entries:
        raise ValueError("a model card needs at least one patch")
    ours = card_metadata(entries, base_model=base_model)
    meta: dict[str, Any] = {}
    body_before, body_after = "", ""
    if existing:
        old_meta, old_body = split_front_matter(existing)
        if old_meta:
            meta.update(old_meta)
            old_tags = old_meta.get("tags")
            if isinstance(old_tags, list):
                ours["tags"] = list(ours["tags"]) + [t for t in old_tags if t not in ours["tags"]]
        if BEGIN in old_body and END in old_body.split(BEGIN, 1)[1]:
            body_before, rest = old_body.split(BEGIN, 1)
            body_after = rest.split(END, 1)[1]
        else:
            body_after = old_body
    meta.update(ours)  # without a known Hub id for the base, an owner-written base_model is kept
    front = yaml.safe_dump(_plain(meta), sort_keys=False, allow_unicode=True, default_flow_style=False)
    body = render_body(entries, repo_id=repo_id)
    before = body_before.strip("\n") + "\n\n" if body_before.strip() else ""
    after = "\n" + body_after.strip("\n") + "\n" if body_after.strip() else ""
    return f"---\n{front}---\n{before}{body}{after}"


def _plain(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x
