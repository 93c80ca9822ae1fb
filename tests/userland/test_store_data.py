"""Reading a data set's source file record by record (llmos/store_data.py): text lines and paragraphs, JSON lines
and CSV columns, bad rows named by their line (or skipped), without a kernel."""

import io
import json

import pytest

from llmos.store_data import check_name, read_records
from llmos.syscalls.errors import InvalidArgument


def records(data: bytes, fmt="text", **kw):
    return list(read_records(io.BytesIO(data), fmt, source="f.txt", **kw))


def test_text_is_a_record_per_non_empty_line_or_per_paragraph():
    data = "one\r\ntwo  \n\n  \nthree héllo\n\nfour\nfive".encode()
    assert records(data) == ["one", "two  ", "three héllo", "four", "five"]
    assert records(data, paragraphs=True) == ["one\ntwo  ", "three héllo", "four\nfive"]
    assert records(b"\xef\xbb\xbfbom first\n") == ["bom first"]  # a UTF-8 BOM is not text
    assert records(b"") == [] and records(b"\n\n", paragraphs=True) == []


def test_jsonl_takes_the_text_field_or_the_one_named_and_names_a_bad_lines_number():
    data = b'{"text": "a"}\n\n{"text": "b\\nc", "x": 1}\n{"body": "z", "text": ""}\n'
    assert records(data, "jsonl") == ["a", "b\nc"]  # blank lines and empty values skipped
    assert records(b'{"body": "q"}\n', "jsonl", field="body") == ["q"]
    for bad, why in ((b'{"text": "a"}\n{"text": \n', "line 2: invalid JSON"), (b'{"text": "a"}\n{"t": 1}\n',
                     "line 2: no field 'text'"), (b'[1]\n', "line 1: a JSON list, not an object"),
                     (b'{"text": 5}\n', "line 1: field 'text' is a int, not a string")):
        with pytest.raises(InvalidArgument, match=f"f.txt: {why}"):
            records(bad, "jsonl")


def test_skip_bad_skips_the_bad_rows_and_says_which():
    skipped = []
    data = b'{"text": "a"}\nnot json\n{"text": "b"}\n{"nope": 1}\n'
    assert records(data, "jsonl", skip_bad=True, skipped=skipped) == ["a", "b"]
    assert skipped == [2, 4]


def test_csv_takes_the_text_column_the_field_named_or_the_only_one():
    data = b'id,text\n1,hello\n2,"two\nlines, quoted"\n3,\n'
    assert records(data, "csv") == ["hello", "two\nlines, quoted"]
    assert records(b"a,b\n1,x\n2,y\n", "csv", field="b") == ["x", "y"]
    assert records(b"only\nr1\nr2\n", "csv") == ["r1", "r2"]
    with pytest.raises(InvalidArgument, match="2 columns and none is 'text': name one with --field"):
        records(b"a,b\n1,2\n", "csv")
    with pytest.raises(InvalidArgument, match="no column 'c'"):
        records(b"a,b\n1,2\n", "csv", field="c")
    with pytest.raises(InvalidArgument, match="line 3: 1 columns, the header has 2"):
        records(b"id,text\n1,ok\n2\n", "csv")


def test_text_that_is_not_utf8_is_refused_naming_its_line():
    with pytest.raises(InvalidArgument, match=r"f.txt: line 2: not UTF-8 \(byte 1\) \(--skip-bad"):
        records(b"fine\nx\xff\n")


@pytest.mark.parametrize("fmt, data, kept, lines", [
    ("text", b"fine\nx\xff\nalso fine\n\xc3\n", ["fine", "also fine"], [2, 4]),
    ("jsonl", b'{"text": "a"}\n{"text": "\xff"}\n{"text": "b"}\n', ["a", "b"], [2]),
    ("csv", b'id,text\n1,a\n2,\xfe\n3,b\n4,\xff\n', ["a", "b"], [3, 5]),
])
def test_skip_bad_skips_and_counts_lines_that_are_not_utf8_in_every_format(fmt, data, kept, lines):
    skipped: list[int] = []
    assert records(data, fmt, skip_bad=True, skipped=skipped) == kept
    assert skipped == lines
    with pytest.raises(InvalidArgument, match=f"line {lines[0]}: not UTF-8"):
        records(data, fmt)


def test_a_csv_header_that_is_not_utf8_is_refused_even_with_skip_bad():
    with pytest.raises(InvalidArgument, match="line 1 \\(the CSV header\\) is not UTF-8"):
        records(b"id,t\xffext\n1,a\n", "csv", skip_bad=True)


def test_options_that_do_not_fit_the_format_are_einval():
    with pytest.raises(InvalidArgument, match="paragraphs applies to the text format"):
        records(b"x", "jsonl", paragraphs=True)
    with pytest.raises(InvalidArgument, match="field applies to jsonl and csv"):
        records(b"x", "text", field="t")
    with pytest.raises(InvalidArgument, match="format 'xml'"):
        records(b"x", "xml")


@pytest.mark.parametrize("name", ["", ".x", "a/b", "a b", "x" * 129, None])
def test_a_data_set_name_is_one_store_name(name):
    with pytest.raises(InvalidArgument):
        check_name(name)
    assert check_name("wiki-2.raw_v1") == "wiki-2.raw_v1"


def test_a_big_source_is_read_one_line_at_a_time():
    class Lines(io.RawIOBase):
        """A file of 20,000 lines that no one can read whole: readline only, and it counts."""

        def __init__(self):
            self.n = 0

        def readable(self):
            return True

        def readline(self, limit=-1):
            if self.n == 20_000:
                return b""
            self.n += 1
            return json.dumps({"text": f"record {self.n}"}).encode() + b"\n"

        def read(self, n=-1):
            raise AssertionError("read whole")

    src = Lines()
    it = read_records(src, "jsonl")
    assert next(it) == "record 1" and src.n == 1  # the first record comes before the second line is read
    assert sum(1 for _ in it) == 19_999
