"""lmproxy.decode: JSON from peers, its nesting bounded at a fixed depth."""

from __future__ import annotations

import msgspec
import pytest

from lmproxy import decode


class Thing(msgspec.Struct):
    name: str = ""


def nested(depth: int, inner: bytes = b"1") -> bytes:
    return b'{"a":' * depth + inner + b"}" * depth


@pytest.mark.parametrize("depth", [0, 1, 10, 63, 64])
def test_nesting_up_to_the_limit_decodes(depth):
    value = decode.json(nested(depth))
    for _ in range(depth):
        value = value["a"]
    assert value == 1


@pytest.mark.parametrize("depth", [65, 200, 1000, 100_000])
def test_nesting_past_the_limit_is_a_decode_error_never_recursion(depth):
    with pytest.raises(msgspec.DecodeError, match="nested more than 64 levels"):
        decode.json(nested(depth))
    with pytest.raises(msgspec.DecodeError, match="nested more than 64 levels"):
        decode.json(b'{"name":"x","skipped":' + b"[" * depth + b"]" * depth + b"}", Thing)


def test_arrays_and_objects_mixed_count_one_level_each():
    assert decode.json(b'[{"a":' * 32 + b"1" + b"}]" * 32) is not None
    with pytest.raises(msgspec.DecodeError):
        decode.json(b'[{"a":' * 33 + b"1" + b"}]" * 33)


def test_brackets_inside_strings_do_not_make_a_document_too_deep():
    text = "[" * 500 + "{" * 500
    assert decode.json(msgspec.json.encode({"name": text}), Thing).name == text


def test_brackets_in_strings_cannot_hide_real_depth():
    # Each level's string closes the bracket the level opened, as depth_over sees it:
    # what it cannot tell, msgspec's own recursion limit catches, as the same error.
    depth = 5000
    fake = b'["]",' * depth + b"1" + b',"["]' * depth
    with pytest.raises(msgspec.DecodeError, match="nested more than 64 levels"):
        decode.json(fake)


def test_many_shallow_values_are_not_too_deep():
    wide = msgspec.json.encode({"items": [{"metadata": {"name": f"p{i}"}} for i in range(5000)]})
    assert not decode.depth_over(wide)
    assert len(decode.json(wide)["items"]) == 5000


def test_a_wrong_type_is_a_validation_error():
    with pytest.raises(msgspec.ValidationError):
        decode.json(b'{"name": 5}', Thing)
