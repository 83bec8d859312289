"""Issue 17: fuzzing the readers of untrusted input, 100,000 inputs with a fixed seed.

Four kinds of input, each a mutation of a real one:

- **patch files** (``load_patch``): byte mutations (set, flip, insert, delete, truncate; mostly in
  the safetensors header) of the patches in ``patches/`` (format 1.0), a 1.3 stack of them (with
  ``stacked_from``) and a copy carrying annotations (an audit, ``x-`` keys);
- **patch metadata** (``from_safetensors``, the path of ``load_patch`` after the safetensors
  library): structured JSON mutations of those files' metadata (a node replaced by NaN, 1e999, a
  40-digit integer, an unpaired surrogate, deep nesting, another type, random JSON; keys deleted or
  added);
- **checkpoint headers** (``safetensors_io.read_header`` and ``read_metadata``): byte mutations and
  JSON node replacements of the headers of a tiny checkpoint's shards, its undo data and the patches;
- **checkpoint records** (``checkpoint.record.read_record``): JSON mutations of a real
  ``rompatch.json`` (a chain of two patches and a stack), of its structure or of one of its patches'
  metadata values.

Every patch that loads is also shown (``rompatch show``'s text and ``--json``). An input passes when
the reader returns or raises one of rompatch's own errors (a ``RompatchError``) in one line; anything
else counts as a non-clean exception (must be 0), and its input is saved under
``bench/_work/fuzz-failures`` for ``tests/fuzz_corpus``. The mutations are those of
``tests/test_fuzz.py`` (drawn here from ``random.Random(SEED)`` instead of hypothesis).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import struct
import tempfile
import time
from collections import Counter
from pathlib import Path

TITLE = "Fuzzing the readers of untrusted input: patches, checkpoint headers, records (issue 17)"
FULL_ONLY = True

SEED = 17
COUNTS = {
    "patch file": 30_000,
    "patch metadata": 40_000,
    "checkpoint header": 15_000,
    "checkpoint record": 15_000,
}
HERE = Path(__file__).resolve().parent
REPO = HERE.parent
FAILURES = HERE / "_work" / "fuzz-failures"


def _random_json(rng: random.Random, depth: int = 0):
    kind = rng.randrange(8 if depth < 3 else 5)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.choice([0, 1, -1, 7, 2**31, 2**64, -(2**70), rng.randrange(-1000, 1000)])
    if kind == 3:
        return rng.choice([0.5, -2.25, 1e300, 1e-300, rng.uniform(-10, 10)])
    if kind == 4:
        return "".join(rng.choice('ab{}é\\"\n 0') for _ in range(rng.randrange(6)))
    if kind in (5, 6):
        return [_random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {f"k{rng.randrange(5)}": _random_json(rng, depth + 1) for _ in range(rng.randrange(4))}


def _text(rng: random.Random, nasty: list[str]) -> str:
    return rng.choice(nasty) if rng.random() < 0.6 else json.dumps(_random_json(rng))


def _map_ops(rng: random.Random, nasty: list[str]) -> list[tuple]:
    kinds = ["node", "node", "node", "node", "raw", "delete", "add"]
    return [
        (rng.choice(kinds), rng.randrange(1000), rng.randrange(100_000), _text(rng, nasty))
        for _ in range(rng.randint(1, 3))
    ]


def _byte_ops(rng: random.Random) -> list[tuple]:
    kinds = ["set", "flip", "flip", "insert", "delete", "truncate"]
    return [(rng.choice(kinds), rng.randrange(2**20), rng.randrange(256)) for _ in range(rng.randint(1, 4))]


class Tally:
    """Outcomes of one kind of input."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.inputs = 0
        self.ok = 0
        self.clean: Counter[str] = Counter()
        self.unclean: Counter[str] = Counter()
        self.reasons: Counter[str] = Counter()
        self.shown = 0

    def run(self, call, save) -> object | None:
        """``call()``; a RompatchError of one line is clean. Returns what it returned (None on error)."""
        from rompatch.errors import RompatchError

        self.inputs += 1
        try:
            out = call()
        except RompatchError as e:
            if "\n" in str(e):
                self._unclean(f"{type(e).__name__} of more than one line", e, save)
            else:
                self.clean[type(e).__name__] += 1
                self.reasons[_reason(str(e))] += 1
            return None
        except Exception as e:  # noqa: BLE001 - counting exactly these is the point
            self._unclean(type(e).__name__, e, save)
            return None
        self.ok += 1
        return out

    def check(self, call, save) -> None:
        """``call()`` on an input already counted (a second reader of it, or showing a loaded patch):
        only a non-clean exception is counted."""
        from rompatch.errors import RompatchError

        try:
            call()
        except RompatchError as e:
            if "\n" in str(e):
                self._unclean(f"{type(e).__name__} of more than one line", e, save)
        except Exception as e:  # noqa: BLE001
            self._unclean(type(e).__name__, e, save)

    def _unclean(self, what: str, e: Exception, save) -> None:
        self.unclean[what] += 1
        if sum(self.unclean.values()) <= 20:
            FAILURES.mkdir(parents=True, exist_ok=True)
            save(FAILURES / f"{self.name.replace(' ', '-')}-{self.inputs}", f"{what}: {e}"[:500])


def _reason(message: str) -> str:
    """A refusal's kind: its message without the file name, details, names and numbers."""
    m = message.split(": ", 1)[-1] if message.startswith(("/", "fuzz")) else message
    head, _, detail = m.partition(" (")
    if head in (
        "not a readable safetensors file",
        "not a valid safetensors file",
        "not a valid rompatch record",
    ):
        detail = re.split(r"\);|\)$", detail)[0]
        m = f"{head}: {detail}"  # what is wrong is in the parentheses
    m = re.split(r" \(|;|, got ", m)[0]
    m = re.sub(r"'[^']*'|\b[0-9a-f]{12,64}\b|\d+", "…", m)
    return m[:90]


def _show(tally: Tally, patch) -> None:
    """A loaded patch must show (text and JSON) without an exception."""
    from rompatch.cli.show import format_patch

    def show():
        format_patch(patch)
        json.dumps(patch.summary(), ensure_ascii=False, allow_nan=False)

    tally.shown += 1
    tally.check(show, lambda path, why: path.with_suffix(".show.txt").write_text(why + "\n"))


def _sources(work: Path) -> dict:
    """The real inputs every mutation starts from."""
    from safetensors import safe_open

    from rompatch.checkpoint.operations import apply_to_checkpoint
    from rompatch.constants import CHECKPOINT_RECORD, CHECKPOINT_UNDO
    from rompatch.patch import load_patch, save_patch
    from rompatch.stack import stack_patches
    from tests.helpers import vector_patch
    from tests.helpers.ckpt import make_ckpt, weight_files

    real = sorted((REPO / "patches").glob("*.safetensors"))
    stack = save_patch(stack_patches([load_patch(p) for p in real]), work / "stack.safetensors")
    annotated = load_patch(real[0])
    annotated.extra["audit"] = json.dumps(
        {"patch_id": annotated.id, "summary": {"verdict": "pass"}, "tokens": 5}
    )
    annotated.extra["x-note"] = "reviewed"
    annotated = save_patch(annotated, work / "annotated.safetensors")
    files = [*real, stack, annotated]
    metas = []
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            metas.append((dict(st.metadata()), {k: st.get_tensor(k) for k in st.keys()}))

    model, base = make_ckpt(work)
    p1, p2 = vector_patch(model, layer=1, n=2), vector_patch(model, layer=2, subject="B", seed=3)
    s = stack_patches(
        [vector_patch(model, layer=3, subject="C", seed=4), vector_patch(model, 3, subject="D", seed=5)]
    )
    apply_to_checkpoint(base, [p1, p2, s], work / "out", link=False)
    record = (work / "out" / CHECKPOINT_RECORD).read_text()
    headers = [
        f.read_bytes()[:65536] for f in [*weight_files(work / "out"), work / "out" / CHECKPOINT_UNDO, *files]
    ]
    return {
        "files": [f.read_bytes() for f in files],
        "metas": metas,
        "record": record,
        "folder": work / "out",
        "headers": headers,
    }


def _header_input(rng: random.Random, headers: list[bytes], nasty: list[str]) -> bytes:
    """A header (with its data section, or part of it) mutated as bytes or as JSON."""
    from rompatch.safetensors_io import frame_header
    from tests.test_fuzz import mutate_bytes, replace_node

    data = rng.choice(headers)
    (n,) = struct.unpack("<Q", data[:8])
    if rng.random() < 0.5 and n <= len(data) - 8:
        text = data[8 : 8 + n].decode("utf-8", "replace").rstrip()
        for _ in range(rng.randint(1, 2)):
            text = replace_node(text, rng.randrange(100_000), _text(rng, nasty))
        body = data[8 + n :] if rng.random() < 0.8 else data[8 + n : 8 + n + rng.randrange(64)]
        return frame_header(text.encode("utf-8", "surrogatepass")) + body
    return mutate_bytes(data, _byte_ops(rng), hot=8 + n)


def _record_input(rng: random.Random, record: str, nasty: list[str]) -> str:
    from tests.test_fuzz import mutate_map, replace_node

    raw = json.loads(record)
    if rng.random() < 0.5:
        entry = rng.choice(raw["applied"])
        entry["patch"] = mutate_map(entry["patch"], _map_ops(rng, nasty))
        return json.dumps(raw, ensure_ascii=False)
    text = record
    for _ in range(rng.randint(1, 2)):
        text = replace_node(text, rng.randrange(100_000), _text(rng, nasty))
    return text


def run() -> dict:
    import torch

    from rompatch.checkpoint.record import read_record
    from rompatch.constants import CHECKPOINT_RECORD
    from rompatch.patch import from_safetensors, load_patch
    from rompatch.safetensors_io import read_header, read_metadata
    from tests.test_fuzz import NASTY, mutate_bytes, mutate_map

    torch.set_num_threads(1)
    logging.disable(logging.WARNING)  # dropped audits and the like are logged; not wanted 100,000 times
    rng = random.Random(SEED)
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
    work = Path(tempfile.mkdtemp(prefix="rompatch-fuzz-", dir=shm))
    shutil.rmtree(FAILURES, ignore_errors=True)
    loads = [os.getloadavg()[0]]
    try:
        src = _sources(work)
        tallies = {name: Tally(name) for name in COUNTS}
        t0 = time.perf_counter()
        target = work / "input.safetensors"
        folder = src["folder"]
        record_path = folder / CHECKPOINT_RECORD
        for name, count in COUNTS.items():
            tally = tallies[name]
            for i in range(count):
                if i % 5000 == 0:
                    loads.append(os.getloadavg()[0])
                if name == "patch file":
                    data = rng.choice(src["files"])
                    (n,) = struct.unpack("<Q", data[:8])
                    data = mutate_bytes(data, _byte_ops(rng), hot=8 + n)
                    target.write_bytes(data)
                    patch = tally.run(lambda: load_patch(target), lambda p, why, d=data: _save(p, why, d))
                elif name == "patch metadata":
                    meta, tensors = rng.choice(src["metas"])
                    meta = mutate_map(meta, _map_ops(rng, NASTY))
                    patch = tally.run(
                        lambda m=meta, t=tensors: from_safetensors(m, t, where="fuzz"),
                        lambda p, why, m=meta: _save(
                            p, why, json.dumps(m, ensure_ascii=False).encode("utf-8", "surrogatepass")
                        ),
                    )
                elif name == "checkpoint header":
                    data = _header_input(rng, src["headers"], NASTY)
                    target.write_bytes(data)
                    patch = None
                    tally.run(lambda: read_header(target), lambda p, why, d=data: _save(p, why, d))
                    tally.check(
                        lambda: _metadata_ok(read_metadata(target)), lambda p, why, d=data: _save(p, why, d)
                    )
                else:
                    text = _record_input(rng, src["record"], NASTY)
                    record_path.write_text(text, encoding="utf-8", errors="surrogatepass")
                    patch = None
                    tally.run(
                        lambda: read_record(folder),
                        lambda p, why, t=text: _save(p, why, t.encode("utf-8", "surrogatepass")),
                    )
                if patch is not None:
                    _show(tally, patch)
            record_path.write_text(src["record"])
        seconds = time.perf_counter() - t0
        loads.append(os.getloadavg()[0])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return _report(tallies, seconds, loads)


def _metadata_ok(meta) -> bool:
    if meta is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise AssertionError("read_metadata returned a map that is not strings to strings")
    return True


def _save(path: Path, why: str, data: bytes) -> None:
    path.with_suffix(".input").write_bytes(data)
    path.with_suffix(".txt").write_text(why + "\n")


def _report(tallies: dict[str, Tally], seconds: float, loads: list[float]) -> dict:
    total = sum(t.inputs for t in tallies.values())
    unclean = sum(sum(t.unclean.values()) for t in tallies.values())
    clean = sum(sum(t.clean.values()) for t in tallies.values())
    ok = sum(t.ok for t in tallies.values())
    rows = [
        {"metric": "inputs", "value": total, "unit": "", "target": "≥ 100,000", "note": f"seed {SEED}"},
        {"metric": "non-clean exceptions", "value": unclean, "unit": "", "target": "0",
         "note": "any exception other than a one-line RompatchError" + (f": {_top(tallies)}" if unclean else "")},
        {"metric": "clean refusals (RompatchError, one line)", "value": clean, "unit": "", "target": "", "note": ""},
        {"metric": "read or loaded OK", "value": ok, "unit": "", "target": "",
         "note": f"{sum(t.shown for t in tallies.values()):,} loaded patches also shown (text and JSON)"},
        {"metric": "wall time", "value": round(seconds, 1), "unit": "s", "target": "",
         "note": f"{seconds / total * 1e3:.2f} ms per input"},
        {"metric": "load average seen", "value": f"{min(loads):.2f}–{max(loads):.2f}", "unit": "", "target": "",
         "note": "1-minute load average, sampled every 5,000 inputs (2 cores shared with other jobs)"},
    ]  # fmt: skip
    classes = sorted({c for t in tallies.values() for c in t.clean})
    lines = [
        "| input | inputs | OK | " + " | ".join(classes) + " | non-clean |",
        "| --- | ---: | ---: | " + " | ".join("---:" for _ in classes) + " | ---: |",
    ]
    for t in tallies.values():
        cells = " | ".join(f"{t.clean.get(c, 0):,}" for c in classes)
        lines.append(f"| {t.name} | {t.inputs:,} | {t.ok:,} | {cells} | {sum(t.unclean.values())} |")
    lines += [
        "",
        "The most frequent refusals of each kind of input (messages without names and numbers):",
        "",
    ]
    lines += ["| input | refusal | count |", "| --- | --- | ---: |"]
    for t in tallies.values():
        for why, n in t.reasons.most_common(6):
            lines.append(f"| {t.name} | {why.replace('|', '/')} | {n:,} |")
    setup = (
        "Mutations of real inputs (see `bench/bench_fuzz.py`): byte mutations of patch files (the three in "
        "`patches/`, a 1.3 stack of them, an annotated copy) read with `load_patch`; JSON mutations of their "
        "metadata read with `from_safetensors`; byte and JSON mutations of safetensors headers (a tiny "
        "checkpoint's shards and undo data, the patches) read with `read_header` and `read_metadata`; JSON "
        "mutations of a real `rompatch.json` (two patches and a stack) read with `read_record`. Every patch "
        "that loads is also shown. Columns: how each input ended (OK, or the error class it was refused with)."
    )
    return {"rows": rows, "markdown": "\n".join(lines), "setup": setup}


def _top(tallies: dict[str, Tally]) -> str:
    c = Counter()
    for t in tallies.values():
        c.update({f"{t.name}: {k}": v for k, v in t.unclean.items()})
    return ", ".join(f"{k} ×{v}" for k, v in c.most_common(5))


if __name__ == "__main__":
    print(json.dumps(run(), indent=2, ensure_ascii=False))
