"""Fuzzing the readers of untrusted input (issue 17): patch files, the safetensors headers of
checkpoints, and checkpoint records (``rompatch.json``).

A reader either returns or raises one of rompatch's own errors (a ``RompatchError``, one line); any
other exception is a bug. The properties run with a fixed seed and a small budget (a few seconds);
``bench/bench_fuzz.py`` runs the same kinds of mutation 100,000 times. ``tests/fuzz_corpus`` keeps
inputs that once gave tracebacks, replayed by ``test_corpus``.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from rompatch.checkpoint.record import read_record
from rompatch.constants import CHECKPOINT_RECORD, CHECKPOINT_UNDO
from rompatch.errors import RompatchError
from rompatch.patch import from_safetensors, load_patch
from rompatch.safetensors_io import frame_header, read_header, read_metadata

REPO = Path(__file__).resolve().parent.parent
REAL = REPO / "patches" / "eiffel-tower-rome.safetensors"
CORPUS = Path(__file__).resolve().parent / "fuzz_corpus"


def fuzz_settings(n: int) -> settings:
    return settings(
        derandomize=True,
        max_examples=n,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# JSON texts that broke readers, or come close to a limit: non-finite and huge numbers, unpaired
# surrogate escapes, deep nesting, wrong types.
NASTY = [
    "NaN",
    "Infinity",
    "-Infinity",
    "1e999",
    "-1e999",
    "2e906",
    "1" * 21,
    "1" * 40,
    "1" * 400,
    "-1",
    "0",
    "1.5",
    "4294967296",
    "true",
    "false",
    "null",
    '""',
    '"x"',
    '"\\ud800"',
    '"a\\udfffb"',
    '"\\ud83d\\ude00"',
    "[]",
    "{}",
    "[1,2]",
    "[1e999,1]",
    "[" * 64 + "]" * 64,
    "[" * 65 + "]" * 65,
    "[" * 3000 + "]" * 3000,
    '{"a":' * 70 + "1" + "}" * 70,
    '"' + "f" * 64 + '"',
    '[{"id":"' + "a" * 64 + '","deltas":[0,1]}]',
    '{"inputs":[{"id":"' + "b" * 64 + '","deltas":[0,1]}],"condition":{"x":1.0}}',
]

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
json_texts = st.sampled_from(NASTY) | json_values.map(json.dumps)

SENTINEL = "\x00rompatch-fuzz\x00"


def _nodes(value, path=()):
    """Every path into a parsed JSON value (the value itself first)."""
    out = [path]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _nodes(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _nodes(v, (*path, i))
    return out


def replace_node(text: str, pick: int, replacement: str) -> str:
    """JSON ``text`` with one of its nodes (``pick`` modulo their number) replaced by the JSON text
    ``replacement``; ``text`` itself when it is not JSON."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):  # not JSON, or nested too deep for Python's parser
        return text
    paths = _nodes(value)
    path = paths[pick % len(paths)]
    if not path:
        return replacement
    node = value
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = SENTINEL
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).replace(
        json.dumps(SENTINEL), replacement, 1
    )


def mutate_map(meta: dict[str, str], ops) -> dict[str, str]:
    """A string map (patch metadata) changed by ``ops``: (kind, key pick, node pick, text)."""
    out = dict(meta)
    for kind, kpick, npick, text in ops:
        keys = sorted(out)
        if kind == "add" or not keys:
            out[f"k{kpick % 7}" if kpick % 2 else f"x-{kpick % 5}"] = text
            continue
        key = keys[kpick % len(keys)]
        if kind == "node":
            out[key] = replace_node(out[key], npick, text)
        elif kind == "raw":
            out[key] = text
        elif kind == "delete":
            del out[key]
    return out


map_ops = st.lists(
    st.tuples(
        st.sampled_from(["node", "node", "node", "raw", "delete", "add"]),
        st.integers(0, 1000),
        st.integers(0, 100_000),
        json_texts,
    ),
    min_size=1,
    max_size=3,
)


def mutate_bytes(data: bytes, ops, *, hot: int) -> bytes:
    """``data`` with byte-level ``ops``: (kind, position pick, value); positions mostly in the first
    ``hot`` bytes (where the header is)."""
    b = bytearray(data)
    for kind, pos, value in ops:
        if not b:
            break
        at = pos % (hot if pos % 4 else len(b)) % len(b)
        if kind == "set":
            b[at] = value
        elif kind == "flip":
            b[at] ^= 1 << (value % 8)
        elif kind == "insert":
            b[at:at] = bytes([value]) * (1 + value % 3)
        elif kind == "delete":
            del b[at : at + 1 + value % 3]
        elif kind == "truncate":
            del b[at:]
    return bytes(b)


byte_ops = st.lists(
    st.tuples(
        st.sampled_from(["set", "flip", "flip", "insert", "delete", "truncate"]),
        st.integers(0, 2**20),
        st.integers(0, 255),
    ),
    min_size=1,
    max_size=4,
)


def clean(call, *args):
    """``call(*args)``; a RompatchError (one line) is a clean refusal. Anything else propagates."""
    try:
        return call(*args)
    except RompatchError as e:
        assert "\n" not in str(e), f"a {type(e).__name__} of more than one line: {e!r}"
        return e


@pytest.fixture(scope="module")
def real():
    with safe_open(str(REAL), framework="pt") as f:
        return dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}, REAL.read_bytes()


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


# ----------------------------------------------------------------------------------- patches


@fuzz_settings(300)
@given(ops=map_ops)
def test_metadata_mutations(real, ops):
    meta, tensors, _ = real
    clean(from_safetensors, mutate_map(meta, ops), tensors)


@fuzz_settings(100)
@given(
    meta=st.dictionaries(
        st.sampled_from(
            [
                "format",
                "format_version",
                "rompatch_version",
                "patch_id",
                "created_at",
                "base",
                "parameters",
                "deltas",
                "lineage",
                "stacked_from",
                "merged_from",
                "extracted_from",
                "audit",
                "signature",
                "x-note",
                "other",
            ]
        ),
        json_texts | st.sampled_from(["rompatch", "1.3", "1.0", "9.0", "a" * 64]),
        max_size=16,
    )
)
def test_generated_metadata(real, meta):
    clean(from_safetensors, {"format": "rompatch", "format_version": "1.3", **meta}, real[1])


@fuzz_settings(120)
@given(ops=byte_ops)
def test_byte_mutations_of_a_patch_file(real, scratch, ops):
    data = real[2]
    (n,) = struct.unpack("<Q", data[:8])
    path = scratch / "p.safetensors"
    path.write_bytes(mutate_bytes(data, ops, hot=8 + n))
    clean(load_patch, path)


# ------------------------------------------------------------------------ checkpoint headers

dtypes = st.sampled_from(["F32", "F16", "BF16", "I8", "U8", "BOOL", "F64", "Q7", "", "f32"]) | json_values
ints_or_worse = st.integers(-4, 64) | st.sampled_from([2**64, 10**40, 1.0, "8", True, None])


@st.composite
def headers(draw):
    entries, at = {}, 0
    for i in range(draw(st.integers(0, 3))):
        shape = draw(st.lists(ints_or_worse, max_size=3))
        size = draw(ints_or_worse)
        end = at + size if isinstance(size, int) and not isinstance(size, bool) else size
        entry = {"dtype": draw(dtypes), "shape": shape, "data_offsets": [at, end]}
        if draw(st.booleans()):
            entry = draw(st.sampled_from([entry, [entry], {"dtype": "F32"}, None]))
        entries[draw(st.sampled_from([f"t{i}", "__metadata__", "\\ud800"]))] = entry
        at = end if isinstance(end, int) and not isinstance(end, bool) else at
    if draw(st.booleans()):
        entries["__metadata__"] = draw(st.dictionaries(st.text(max_size=4), json_values, max_size=3))
    text = json.dumps(entries).replace('"\\\\ud800"', '"\\ud800"')
    if draw(st.booleans()):
        text = replace_node(text, draw(st.integers(0, 1000)), draw(json_texts))
    return text.encode("utf-8", "surrogatepass"), draw(st.integers(0, 80))


@fuzz_settings(200)
@given(h=headers(), ops=st.none() | byte_ops)
def test_checkpoint_headers(scratch, h, ops):
    text, data_len = h
    data = frame_header(text) + bytes(data_len)
    if ops:
        data = mutate_bytes(data, ops, hot=len(data))
    path = scratch / "h.safetensors"
    path.write_bytes(data)
    clean(read_header, path)
    meta = read_metadata(path)
    assert meta is None or all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())


@fuzz_settings(100)
@given(ops=byte_ops)
def test_byte_mutations_of_a_header(real, scratch, ops):
    data = real[2]
    (n,) = struct.unpack("<Q", data[:8])
    path = scratch / "hb.safetensors"
    path.write_bytes(mutate_bytes(data, ops, hot=8 + n))
    clean(read_header, path)
    read_metadata(path)


# ---------------------------------------------------------------------------------- records


@pytest.fixture(scope="module")
def record_folder(tmp_path_factory):
    from rompatch.checkpoint.operations import apply_to_checkpoint
    from tests.helpers import vector_patch
    from tests.helpers.ckpt import make_ckpt

    tmp = tmp_path_factory.mktemp("record")
    model, base = make_ckpt(tmp)
    apply_to_checkpoint(base, [vector_patch(model, layer=1, n=2)], tmp / "out", link=False)
    return tmp / "out", (tmp / "out" / CHECKPOINT_RECORD).read_text()


def mutate_record(text: str, ops) -> str:
    """The record with ops: on its JSON structure ("node"), or on a metadata value of its patch."""
    for kind, kpick, npick, value in ops:
        if kind == "patch":
            raw = json.loads(text)
            try:
                raw["applied"][0]["patch"] = mutate_map(
                    raw["applied"][0]["patch"], [("node", kpick, npick, value)]
                )
            except (KeyError, IndexError, TypeError, AttributeError):
                continue
            text = json.dumps(raw, ensure_ascii=False)
        else:
            text = replace_node(text, npick, value)
    return text


@fuzz_settings(120)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["node", "patch"]), st.integers(0, 1000), st.integers(0, 100_000), json_texts
        ),
        min_size=1,
        max_size=3,
    )
)
def test_record_mutations(record_folder, ops):
    folder, text = record_folder
    (folder / CHECKPOINT_RECORD).write_text(mutate_record(text, ops))
    try:
        clean(read_record, folder)
    finally:
        (folder / CHECKPOINT_RECORD).write_text(text)


# ------------------------------------------------------------------------------------ corpus


def _file_from(case: dict, tmp_path: Path) -> Path:
    src = (REPO / case["data_from"]).read_bytes()
    (n,) = struct.unpack("<Q", src[:8])
    path = tmp_path / "input.safetensors"
    path.write_bytes(frame_header(case["header"].encode()) + src[8 + n :])
    return path


def _replay(case: dict, tmp_path: Path) -> str:
    """What a reader says about the corpus input: its one-line error, or "ok"."""
    target = case["target"]
    if target == "patch":
        got = clean(load_patch, _file_from(case, tmp_path))
    elif target == "show":
        from click.testing import CliRunner

        from rompatch.cli.main import cli

        r = CliRunner().invoke(cli, ["show", str(_file_from(case, tmp_path))])
        assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
        if r.exit_code == 0:
            return r.output
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1, r.stderr
        return lines[0]
    elif target == "header":
        path = tmp_path / "h.safetensors"
        path.write_bytes(frame_header(case["header"].encode()) + bytes(case.get("data_bytes", 0)))
        got = clean(read_header, path)
        assert got is not None
    elif target == "record":
        folder = tmp_path / "ckpt"
        folder.mkdir()
        (folder / CHECKPOINT_RECORD).write_text(case["record"])
        if "undo_bytes" in case:  # undo data of the size the record states, so reading gets past it
            (folder / CHECKPOINT_UNDO).write_bytes(bytes(case["undo_bytes"]))
        got = clean(read_record, folder)
    else:
        raise AssertionError(f"unknown corpus target {target!r}")
    return str(got) if isinstance(got, RompatchError) else "ok"


@pytest.mark.parametrize("path", sorted(CORPUS.glob("*.json")), ids=lambda p: p.stem)
def test_corpus(path, tmp_path):
    """Inputs that gave tracebacks before issue 17, each with what the reader must say now."""
    case = json.loads(path.read_text())
    said = _replay(case, tmp_path)
    assert case["expect"] in said, f"{path.name}: expected {case['expect']!r} in {said!r}"


def test_corpus_is_there():
    assert len(list(CORPUS.glob("*.json"))) >= 15, "tests/fuzz_corpus/README.md says what it holds"
