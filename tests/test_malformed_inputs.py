"""Malformed inputs to every loader end in one clear InversionError, or in a correct result.

Hypothesis generates states files, prompt/target files and cut results files, together with what they hold
by the loaders' contract, so each case is checked exactly: a valid file must load to its content, anything
else must fail with one line that points at the file and names the problem. Malformed CLI configs run as a
few fixed subprocesses (too slow to generate).
"""

from __future__ import annotations

import json
import struct
import subprocess
import tempfile
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pytest
import torch
from hypothesis import assume, event, given, settings, strategies as st
from safetensors.torch import save_file

from lit_inversion.errors import InversionError
from lit_inversion.results import ResultsWriter, read_results
from lit_inversion.sequences import read_sequences
from lit_inversion.sipit.data import read_states
from tests.conftest import TINY_VOCAB, _tokenizer, cli_command
from tests.test_cli import _env, _job_config

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

HIDDEN = 8
R = TypeVar("R")


def _outcome(load: Callable[[], R]) -> R | InversionError:
    """The loader's result or its InversionError; any other exception propagates and fails the test."""
    try:
        return load()
    except InversionError as err:
        return err


def _assert_clear(outcome: object, path: Path, *names: str) -> None:
    """One short line that points at the file and uses a word of (one of) its problems."""
    assert isinstance(outcome, InversionError), f"expected an InversionError, got {outcome!r}"
    message = str(outcome)
    assert "\n" not in message and len(message) < 600, message
    assert str(path) in message, message
    assert not names or any(name in message for name in names), f"{message!r} names none of {names}"


@cache
def _tok() -> PreTrainedTokenizerFast:
    return _tokenizer(TINY_VOCAB)


def _tokens(text: str) -> list[int]:
    return _tok()(text, add_special_tokens=False)["input_ids"]


# States files

_FLOATS = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
_NOT_FLOATS = [torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64]
# NaN/inf, beyond float32 (1e300), beyond float16 (7e4), float16's largest, a float32 subnormal
_SPECIAL = [float("nan"), float("inf"), -float("inf"), 1e30, -1e30, 1e300, 7e4, 65504.0, -0.0, 1e-40]
# How the tensor sits in the file; safetensors can only hold named tensors.
_PT_CONTAINERS = ["bare", "named states", "named other", "states and another", "two others", "list"]
_ST_CONTAINERS = ["named states", "named other", "states and another", "two others"]


@st.composite
def _state_tensors(draw: st.DrawFn) -> torch.Tensor:
    """0-D to 4-D, empty dims, a wrong hidden size, every kind of dtype, NaN/inf and huge values."""
    ndim = draw(st.sampled_from([0, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4]))  # mostly the two valid ranks
    shape = [draw(st.sampled_from([0, 1, 2, 3, 3])) for _ in range(ndim - 1)]
    shape += [draw(st.sampled_from([HIDDEN, HIDDEN, 5, 0]))] if ndim else []
    dtype = draw(st.sampled_from(_FLOATS * 2 + _NOT_FLOATS))
    if not dtype.is_floating_point:
        return torch.randint(0, 5, shape).to(dtype)
    values = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(draw(st.integers(0, 999))))
    for _ in range(draw(st.integers(0, 2)) if values.numel() else 0):
        values.view(-1)[draw(st.integers(0, values.numel() - 1))] = draw(st.sampled_from(_SPECIAL))
    return values.to(dtype)


def _contained(tensor: torch.Tensor, container: str) -> Any:
    other = torch.zeros(2)
    return {"bare": tensor, "named states": {"states": tensor}, "named other": {"h": tensor},
            "states and another": {"states": tensor, "other": other}, "two others": {"a": tensor, "b": other},
            "list": [tensor]}[container]


def _save(path: Path, content: Any) -> None:
    if path.suffix == ".safetensors":
        save_file(content, str(path))
    else:
        torch.save(content, path)


def _problems(tensor: torch.Tensor, container: str) -> list[str]:
    """A word each for what is wrong with this file, by read_states' contract; empty when it is valid."""
    if container == "list":
        return ["tensor"]
    if container == "two others":  # which of the two is meant is anyone's guess
        return ["'states'"]
    states = tensor[None] if tensor.dim() == 2 else tensor
    problems = []
    if states.dim() != 3 or 0 in states.shape[:2]:
        problems.append("shape")
    elif states.shape[-1] != HIDDEN:
        problems.append("hidden size")
    if not states.is_floating_point():
        problems.append("dtype")
    elif not bool(torch.isfinite(states.double()).all()):
        problems.append("NaN or inf")
    elif not bool(torch.isfinite(states.float()).all()):
        problems.append("float32")  # finite in the file, beyond float32's range once converted
    return problems


def _assert_states(outcome: object, expected: torch.Tensor) -> None:
    assert not isinstance(outcome, InversionError), f"valid states refused: {outcome}"
    assert all(row.dtype == torch.float32 and not row.requires_grad for row in outcome)
    assert torch.equal(torch.stack(outcome), expected.float())


@settings(max_examples=300, deadline=None)
@given(tensor=_state_tensors(), suffix=st.sampled_from([".safetensors", ".pt"]), data=st.data())
def test_states_files_load_exactly_or_fail_clearly(tensor: torch.Tensor, suffix: str, data: st.DataObject):
    container = data.draw(st.sampled_from(_ST_CONTAINERS if suffix == ".safetensors" else _PT_CONTAINERS))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"states{suffix}"
        _save(path, _contained(tensor, container))
        outcome = _outcome(lambda: read_states(path, HIDDEN))
    problems = _problems(tensor, container)
    event("valid" if not problems else problems[0])  # --hypothesis-show-statistics: how the cases spread
    if problems:
        _assert_clear(outcome, path, *problems)
    else:
        _assert_states(outcome, tensor[None] if tensor.dim() == 2 else tensor)


@settings(max_examples=80, deadline=None)
@given(suffix=st.sampled_from([".safetensors", ".pt"]), batch=st.sampled_from([None, 1, 3]), data=st.data())
def test_truncated_states_files_fail_clearly(suffix: str, batch: int | None, data: st.DataObject):
    states = torch.randn(*([batch] if batch else []), 4, HIDDEN)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"states{suffix}"
        _save(path, {"states": states} if suffix == ".safetensors" else states)
        whole = path.read_bytes()
        path.write_bytes(whole[: data.draw(st.integers(0, len(whole) - 1), label="cut")])
        outcome = _outcome(lambda: read_states(path, HIDDEN))
    _assert_clear(outcome, path)  # no strict prefix of either format is a whole file


@st.composite
def _safetensors_bytes(draw: st.DrawFn) -> bytes:
    """A safetensors header (often inconsistent: dtype, shape, offsets, declared length) over random data."""
    entry = {"dtype": draw(st.sampled_from(["F32", "F16", "BF16", "F64", "I64", "BOOL", "C64", "F8_E4M3", "XX"])),
             "shape": draw(st.lists(st.integers(-1, 2**40), max_size=3) | st.just([4, HIDDEN])),
             "data_offsets": draw(st.lists(st.integers(-1, 256), min_size=2, max_size=3) | st.just([0, 128]))}
    name = draw(st.sampled_from(["states", "h", "__metadata__"]))
    header = json.dumps({name: entry}).encode()
    declared = len(header) + draw(st.sampled_from([0, 0, -1, 1, 2**40]))
    return struct.pack("<Q", max(declared, 0)) + header + draw(st.binary(max_size=256))


@settings(max_examples=200, deadline=None)
@given(content=st.binary(max_size=300) | st.binary(max_size=200).map(lambda b: b"PK\x03\x04" + b)
       | _safetensors_bytes(),
       suffix=st.sampled_from([".safetensors", ".pt", ".bin", ""]))
def test_random_bytes_as_states_file_fail_clearly(content: bytes, suffix: str):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"states{suffix}"
        path.write_bytes(content)
        outcome = _outcome(lambda: read_states(path, HIDDEN))
    if isinstance(outcome, InversionError):
        _assert_clear(outcome, path)
    else:  # a random header can describe a real tensor; then it must be a proper one
        assert all(row.dtype == torch.float32 and row.shape[-1] == HIDDEN and torch.isfinite(row).all()
                   for row in outcome) and outcome


def _odd_states() -> list[tuple[str, Callable[[], Any], str, str | torch.Tensor]]:
    """(case, what the file holds, its suffix, a word of the expected error or the [1, 2, d] float32 it loads to)."""
    ones = torch.ones(2, HIDDEN)
    return [
        ("sparse COO", lambda: ones.to_sparse(), ".pt", "sparse"),
        ("sparse CSR", lambda: ones.to_sparse_csr(), ".pt", "sparse"),
        ("nested", lambda: torch.nested.nested_tensor([ones, ones[:1]]), ".pt", "nested"),
        ("meta", lambda: torch.empty(2, HIDDEN, device="meta"), ".pt", "meta"),
        ("quantized", lambda: torch.quantize_per_tensor(ones, 0.1, 0, torch.qint8), ".pt", "dtype"),
        ("zero batches", lambda: torch.ones(0, 2, HIDDEN), ".pt", "shape"),
        ("scalar", lambda: torch.tensor(1.0), ".pt", "shape"),
        ("empty dict", lambda: {}, ".pt", "no tensor"),
        ("zero tensors", lambda: {}, ".safetensors", "no tensor"),
        ("string", lambda: "states", ".pt", "tensor"),
        ("None", lambda: None, ".pt", "tensor"),
        ("tuple", lambda: (ones,), ".pt", "tensor"),
        ("dict of lists", lambda: {"states": [[1.0] * HIDDEN]}, ".pt", "tensor"),
        ("float64 1e300", lambda: ones.double() * 1e300, ".pt", "beyond float32's range"),
        ("float64 1e30", lambda: ones.double() * 1e30, ".pt", (ones.double() * 1e30).float()[None]),
        ("float8", lambda: {"states": ones.to(torch.float8_e4m3fn)}, ".safetensors", ones[None]),
        ("requires grad", lambda: torch.nn.Parameter(ones.clone()), ".pt", ones[None]),
        ("int key", lambda: {7: ones}, ".pt", ones[None]),
        ("non-contiguous", lambda: torch.ones(HIDDEN, 2).t(), ".pt", ones[None]),
    ]


@pytest.mark.filterwarnings("ignore::UserWarning")  # nested and sparse CSR tensors warn that they are beta
@pytest.mark.parametrize("case, content, suffix, expected", _odd_states(), ids=[c[0] for c in _odd_states()])
def test_odd_states_contents(tmp_path: Path, case: str, content: Callable[[], Any], suffix: str,
                             expected: str | torch.Tensor):
    path = tmp_path / f"states{suffix}"
    _save(path, content())
    outcome = _outcome(lambda: read_states(path, HIDDEN))
    if isinstance(expected, str):
        _assert_clear(outcome, path, expected)
    else:
        _assert_states(outcome, expected)


def test_wrong_extension_and_not_a_file(tmp_path: Path):
    states = torch.randn(3, HIDDEN)
    save_file({"states": states}, str(tmp_path / "a.pt"))  # safetensors bytes, torch.load's extension
    torch.save(states, tmp_path / "b.safetensors")
    for path in (tmp_path / "a.pt", tmp_path / "b.safetensors"):
        _assert_clear(_outcome(lambda: read_states(path, HIDDEN)), path, "the extension picks the reader")
    torch.save(states, tmp_path / "c.bin")  # any other extension is torch.load's
    _assert_states(_outcome(lambda: read_states(tmp_path / "c.bin", HIDDEN)), states[None])
    _assert_clear(_outcome(lambda: read_states(tmp_path, HIDDEN)), tmp_path, "does not exist")


# Prompt and target files

# A JSON value that is not a valid token id: negative, beyond the vocabulary (up to huge), float, string, ...
_BAD_ID = (st.integers(max_value=-1) | st.integers(TINY_VOCAB, 10**30) | st.floats() | st.text(max_size=3)
           | st.booleans() | st.none() | st.lists(st.integers(0, 5), max_size=2))
_GOOD_IDS = st.lists(st.integers(0, TINY_VOCAB - 1), min_size=1, max_size=6)
_WORDS = st.lists(st.sampled_from(["w3", "w17", "w95", "hello", "caf\u00e9", "w3\u2028w4", "a\x0cb", "\u00a0"]),
                  max_size=4).map(" ".join)
_NOT_TEXT = st.sampled_from([None, 5, 1.5, True, ["w3"], {"w3": 1}, "w3 \ud800"])  # the last: a lone surrogate
_SEQUENCE_ID = st.text(max_size=4) | st.integers(-3, 3) | st.sampled_from([None, 1.5, True, [1], {"a": 1}])
_BLANK = object()  # a line the loader skips


@st.composite
def _jsonl_lines(draw: st.DrawFn) -> tuple[str, Any]:
    """A line and what it holds: (explicit id or None, token ids), None when it must be refused, or _BLANK."""
    kind = draw(st.sampled_from(["ids"] * 3 + ["text"] * 3 + ["bad ids", "bad text", "no field", "not an object",
                                                               "cut", "garbage", "blank"]))
    row: dict[str, Any] = {}
    held: Any = None
    if kind == "ids":
        row["ids"] = draw(_GOOD_IDS)
        held = row["ids"]
    elif kind == "text":
        row["text"] = draw(_WORDS)
        held = _tokens(row["text"]) or None  # no token at all: refused as empty
    elif kind == "bad ids":  # one bad element among good ones, an empty list, or no list at all
        ids = draw(st.lists(st.integers(0, TINY_VOCAB - 1), max_size=3))
        ids.insert(draw(st.integers(0, len(ids))), draw(_BAD_ID))
        row["ids"] = draw(st.just(ids) | st.just([]) | st.integers() | st.text(max_size=3) | st.none()
                          | st.just({"0": 1}))
    elif kind == "bad text":
        row["text"] = draw(_NOT_TEXT)
    elif kind == "no field":
        row = draw(st.sampled_from([{}, {"foo": 1}, {"id": "x"}, {"IDS": [3]}]))
    elif kind == "not an object":
        return json.dumps(draw(st.sampled_from([[3, 4], "w3", 3, None, True]))), None
    elif kind == "cut":  # no strict prefix of a JSON object is valid JSON
        line = json.dumps({"ids": draw(_GOOD_IDS)})
        return line[: draw(st.integers(1, len(line) - 1))], None
    elif kind == "garbage":  # anything on one line; \r would end it like \n does
        # A leading U+FEFF is a BOM; a lone surrogate has no UTF-8 form, so no file can hold one.
        line = draw(st.text(st.characters(exclude_characters="\n\r\ufeff", exclude_categories=("Cs",)), max_size=12))
        assume(line.strip())
        try:
            json.loads(line)
        except ValueError:
            return line, None
        assume(False)  # happened to be JSON: left to the kinds above
    else:
        return draw(st.sampled_from(["", "  ", "\t", "\u00a0"])), _BLANK
    if held is not None and draw(st.integers(0, 2)) == 0:  # a third of the good lines name their id
        row["id"] = draw(_SEQUENCE_ID)
        valid_id = isinstance(row["id"], (str, int)) and not isinstance(row["id"], bool)
        held = (str(row["id"]), held) if valid_id else None
    elif held is not None:
        held = (None, held)
    line = json.dumps(row, ensure_ascii=draw(st.booleans()))  # ensure_ascii=False: raw U+2028 and é
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:  # a raw lone surrogate has no UTF-8 form: its \u escape is the JSON way
        line = json.dumps(row)
    return line, held


def _expected_sequences(held: list[Any], stem: str) -> tuple[list[tuple[str, list[int]]], int | None]:
    """What the file holds, and the number of its first bad line (None: valid; 0: nothing in it)."""
    sequences, seen = [], set()
    for number, line in enumerate(held, start=1):
        if line is _BLANK:
            continue
        if line is None:
            return sequences, number
        sequence_id = line[0] if line[0] is not None else f"{stem}-{number}"
        if sequence_id in seen:  # results are matched by id: a repeat is refused
            return sequences, number
        seen.add(sequence_id)
        sequences.append((sequence_id, line[1]))
    return sequences, None if sequences else 0


def _assert_sequences(outcome: object, path: Path, expected: list, bad_line: int | None) -> None:
    if bad_line is None:
        assert outcome == expected, outcome
    elif bad_line == 0:
        _assert_clear(outcome, path, "is empty")
    else:
        _assert_clear(outcome, path, f"{path}:{bad_line} ", f"{path}:{bad_line}:", f"line {bad_line} of {path}")


@settings(max_examples=300, deadline=None)
@given(lines=st.lists(_jsonl_lines(), max_size=5), newline=st.sampled_from(["\n", "\r\n"]),
       bom=st.booleans(), final_newline=st.booleans())
def test_jsonl_files_load_exactly_or_fail_at_the_first_bad_line(lines: list[tuple[str, Any]], newline: str,
                                                                 bom: bool, final_newline: bool):
    text = newline.join(line for line, _ in lines) + (newline if final_newline else "")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "targets.jsonl"
        path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
        outcome = _outcome(lambda: read_sequences(path, _tok(), TINY_VOCAB, option="--data.targets_file"))
    expected, bad_line = _expected_sequences([held for _, held in lines], path.stem)
    event("valid" if bad_line is None else "empty" if bad_line == 0 else "refused")
    _assert_sequences(outcome, path, expected, bad_line)


# Pieces of .txt lines: words, whitespace of every kind, characters str.splitlines() would wrongly split at.
_TXT_PIECES = st.sampled_from(["w3", "w4", "w95", "x", " ", "\t", "\x0b", "\x0c", "\x1c", "\x85", "\u2028", "\u00a0",
                               "\u00e9", "\ufeff"])


@settings(max_examples=200, deadline=None)
@given(lines=st.lists(st.lists(_TXT_PIECES, max_size=5).map("".join), max_size=5),
       newline=st.sampled_from(["\n", "\r\n", "\r"]),
       encoding=st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "latin-1"]),
       junk=st.sampled_from([b"", b"\xff", b"\xc3", b"\xed\xa0\x80"]))  # invalid, cut, surrogate in UTF-8
def test_txt_files_load_exactly_or_fail_clearly(lines: list[str], newline: str, encoding: str, junk: bytes):
    data = newline.join(lines).encode(encoding, "replace") + junk  # "replace": latin-1 has no U+2028
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "prompts.txt"
        path.write_bytes(data)
        outcome = _outcome(lambda: read_sequences(path, _tok(), TINY_VOCAB))
    try:
        text = data.decode("utf-8-sig")  # the contract: UTF-8, with or without a BOM
    except UnicodeDecodeError:
        _assert_clear(outcome, path, "not UTF-8")
        return
    held = [_BLANK if not line.strip() else ((None, _tokens(line)) if _tokens(line) else None)
            for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]  # only newlines end a line
    _assert_sequences(outcome, path, *_expected_sequences(held, path.stem))


_BAD_JSONL = [  # (case, file content, words of its error)
    ("only whitespace", b" \n\t\n\xc2\xa0\n", "is empty"),
    ("empty", b"", "is empty"),
    ("UTF-16 with BOM", '{"ids": [3]}\n'.encode("utf-16"), "not UTF-8"),
    ("latin-1", '{"ids": [3]}\n{"text": "caf\u00e9"}\n'.encode("latin-1"), "not UTF-8 text (line 2)"),
    ("integer beyond the digit limit", b'{"ids": [' + b"9" * 5000 + b"]}\n", "too many digits"),
    ("nested too deep", b'{"ids": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n", "nested too deep"),
    ("true as an id", b'{"ids": [true, 3]}\n', '"ids" must be a list of integers'),
    ("null text", b'{"text": null}\n', '"text" must be a string'),
    ("lone surrogate", b'{"text": "w3 \\ud800"}\n', "unpaired surrogate"),
    ("null id", b'{"id": null, "ids": [3]}\n', '"id" must be a string or an integer'),
    ("id repeating an automatic one", b'{"id": "t-2", "ids": [3]}\n{"ids": [4]}\n', "repeats the id 't-2' of line 1"),
    ("huge id", b'{"ids": [1000000000000000000000000000000]}\n', "outside the vocabulary"),
]


@pytest.mark.parametrize("case, content, problem", _BAD_JSONL, ids=[case for case, _, _ in _BAD_JSONL])
def test_malformed_jsonl_cases(tmp_path: Path, case: str, content: bytes, problem: str):
    path = tmp_path / "t.jsonl"
    path.write_bytes(content)
    _assert_clear(_outcome(lambda: read_sequences(path, _tok(), TINY_VOCAB)), path, problem)


def test_long_lines_and_line_separators_inside_json(tmp_path: Path):
    long_line = " ".join(["w5"] * 20_000)
    (tmp_path / "long.txt").write_text(long_line + "\n")
    assert read_sequences(tmp_path / "long.txt", _tok(), TINY_VOCAB) == [("long-1", [5] * 20_000)]
    # json.dumps(ensure_ascii=False) writes U+2028 raw: valid JSONL, one line
    (tmp_path / "sep.jsonl").write_text(json.dumps({"text": "w3\u2028w4"}, ensure_ascii=False) + "\n")
    assert read_sequences(tmp_path / "sep.jsonl", _tok(), TINY_VOCAB) == [("sep-1", [3, 4])]


# Results files

_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3),
    max_leaves=8)
_RECORDS = st.fixed_dictionaries(
    {"id": st.text(max_size=6) | st.just("a\ud800")},  # an unpaired surrogate must not break the line
    optional={"recovered_text": st.text(max_size=20), "extra": _JSON_VALUES})


@settings(max_examples=100, deadline=None)
@given(records=st.lists(_RECORDS, max_size=6), data=st.data())
def test_results_file_cut_at_any_byte_keeps_exactly_the_complete_records(records: list[dict], data: st.DataObject):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "results.jsonl"
        writer = ResultsWriter(path)
        for record in records:
            writer.write(record)
        whole = path.read_bytes() if records else b""
        assert read_results(path) == records
        cut = data.draw(st.integers(0, len(whole)), label="cut")
        path.write_bytes(whole[:cut])  # what a kill mid-write leaves
        complete = whole[:cut].count(b"\n")
        # Readers that do not repair (rank files of a killed run) skip the cut line, even mid-character.
        assert read_results(path) == records[:complete]
        reopened = ResultsWriter(path)
        assert path.read_bytes() == whole[: whole.rfind(b"\n", 0, cut) + 1]  # the cut line is gone
        assert read_results(path) == records[:complete]
        assert reopened.done_ids == {str(r["id"]) for r in records[:complete]}
        reopened.write({"id": "next"})  # appends start on a fresh line
        assert read_results(path) == records[:complete] + [{"id": "next"}]


@pytest.mark.parametrize("content, line", [
    (b"garbage\n", 1),
    (b'{"id": "a"}\n[1, 2]\n', 2),
    (b'{"no": "id"}\n', 1),
    (b'{"id": "a"}\n\xff\xfe\n', 2),
    (b'{"id": "a"}\n{"id": \n{"id": "b"}\n', 2),  # a cut line that something appended after
])
def test_corrupt_complete_results_lines_fail_clearly(tmp_path: Path, content: bytes, line: int):
    path = tmp_path / "results.jsonl"
    path.write_bytes(content)
    _assert_clear(_outcome(lambda: ResultsWriter(path)), path, f"line {line} ")
    assert path.read_bytes() == content  # refused, not "repaired" by dropping records


# CLI configs

def _bad_configs(model_dir: Path, directory: Path) -> dict[str, tuple[str, tuple[str, ...]]]:
    """case -> (the model and data part of its config, words its error line must use)."""
    def sipit(option: str, prompts: Path) -> str:
        return f"""
model:
  class_path: lit_inversion.sipit.SipItModule
  init_args:
    model_name_or_path: {model_dir}
{option}data:
  class_path: lit_inversion.sipit.HiddenStatesDataModule
  init_args: {{layer: 2, prompts_file: {prompts}}}
"""
    return {
        "invalid-yaml": ("model: [unclosed\n  init_args: {layer: 2\n", ("config",)),
        "unknown-option": (sipit("    no_such_option: 3\n", directory / "p.txt"), ("no_such_option",)),
        "wrong-type": (f"""
model:
  class_path: lit_inversion.dlmi.DlmiModule
  init_args: {{model_name_or_path: {model_dir}, prompt_length: abc}}
data:
  class_path: lit_inversion.dlmi.OutputTargetsDataModule
  init_args: {{targets_file: {directory / "p.txt"}}}
""", ("prompt_length", "abc")),
        "missing-data-file": (sipit("", directory / "missing.txt"), ("missing.txt", "does not exist")),
        # The config class itself rejects the value while jsonargparse instantiates it.
        "out-of-range": (sipit("    method: {class_path: lit_inversion.sipit.SipItConfig, init_args: {map_share: 2.0}}\n",
                                directory / "p.txt"), ("map_share must be in [0, 1]",)),
    }


_CONFIG_CASES = ["invalid-yaml", "unknown-option", "wrong-type", "missing-data-file", "out-of-range"]


@pytest.fixture(scope="module")
def bad_config_runs(tmp_path_factory, tiny_llama_dir) -> dict[str, tuple[subprocess.CompletedProcess, Path, tuple]]:
    """All cases at once: each subprocess mostly waits on imports."""
    started = {}
    for case in _CONFIG_CASES:
        directory = tmp_path_factory.mktemp(case)
        (directory / "p.txt").write_text("w3 w4\n")
        body, words = _bad_configs(tiny_llama_dir, directory)[case]
        command = cli_command() + ["fit", "--config", str(_job_config(directory, body))]
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                env=dict(_env(), OMP_NUM_THREADS="1"))
        started[case] = (proc, directory, words)
    runs = {}
    for case, (proc, directory, words) in started.items():
        _, stderr = proc.communicate(timeout=300)
        runs[case] = (subprocess.CompletedProcess(proc.args, proc.returncode, "", stderr), directory, words)
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("case", _CONFIG_CASES)
def test_malformed_config_ends_in_one_readable_line(bad_config_runs, case: str):
    run, directory, words = bad_config_runs[case]
    assert run.returncode != 0
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    last = [line for line in run.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("lit-inversion: error: ") and len(last) < 400, last
    assert all(word in last for word in words), last
    results = directory / "results.jsonl"
    assert not results.exists() or read_results(results) == []
