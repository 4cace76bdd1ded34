"""The compiled parser under AddressSanitizer and UndefinedBehaviorSanitizer, fed hostile lines.

The extension is built again from `_fastparse.c` with `-fsanitize=address,undefined` into a temporary directory
(never over the installed one) and driven in a subprocess: libasan is preloaded (CPython is not built with it),
Python allocates through malloc so ASan sees every buffer, and any report ends the process (halt_on_error). A
mutation loop over the real lines and varied synthetic lines (bit flips, truncation, splicing, deep nesting, long
strings, invalid UTF-8, odd numbers and escapes) runs for FUZZ_SECONDS through `Parser.parse`, and its output
through `encode_copy` (the PostgreSQL COPY encoder) and `StringSet.add` (uuid dedupe). Needs gcc and libasan
(Debian: gcc, which brings libasan8 and libubsan1).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import textwrap
from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import REAL_EVENTS

from amplitude_export import parse, schema, synthetic

SOURCE = Path(parse.__file__).with_name("_fastparse.c")
FUZZ_SECONDS = 25
FLAGS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g", "-O1"]

pytestmark = pytest.mark.slow


def build(source: Path, out_dir: Path) -> Path:
    """Compile one C file into an extension module named after it, in `out_dir`, with the sanitizers."""
    target = out_dir / (source.stem + sysconfig.get_config_var("EXT_SUFFIX"))
    include = sysconfig.get_paths()["include"]
    subprocess.run(["gcc", *FLAGS, "-shared", "-fPIC", f"-I{include}", str(source), "-o", str(target), "-lm"],
                   check=True, capture_output=True, text=True)
    return target


def run_sanitized(module_dir: Path, script: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run `script` with the sanitized module importable from `module_dir`, libasan preloaded."""
    libasan = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True,
                             check=True).stdout.strip()
    env = {
        **os.environ,
        "LD_PRELOAD": libasan,
        "PYTHONMALLOC": "malloc",
        "PYTHONPATH": str(module_dir),
        "ASAN_OPTIONS": "halt_on_error=1:detect_leaks=0:abort_on_error=0:exitcode=86",
        "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1:exitcode=87",
    }
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=module_dir)


def assert_clean(result: subprocess.CompletedProcess[str]) -> None:
    report = result.stderr
    assert "AddressSanitizer" not in report and "runtime error:" not in report, report[-6000:]
    assert result.returncode == 0, report[-6000:]


FUZZ = textwrap.dedent(r"""
    import json, random, sys, time
    import _fastparse

    config = json.load(open("config.json"))
    keys = tuple(k.encode() for k in config["keys"])
    parser = _fastparse.Parser(keys, config["kinds"])
    pool = [line.encode("latin-1") for line in config["lines"]]
    rng = random.Random(config["seed"])
    tokens = [b"null", b"true", b"false", b"-0", b"1e400", b"-1e-400", b"1.5", b"1e2",
              b"123456789012345678901234567890", b"9223372036854775808", b'"2025-07-01 10:00:00"',
              b'"2025-07-01T10:00:00.1234567"', b'"\\u0000"',
              b'"\\ud83d\\ude00"', b'"\\ud800"', b'"\\u12"', b'"\\', b"[]", b"{}", b'{"a":[1,{"b":null}]}',
              b"0." + b"0" * 200 + b"1", b"1" * 500, b"-", b"1e", b'"' + b"x" * 5000 + b'"',
              b'"2025-02-29 00:00:00"', b'"9999-12-31 23:59:59.999999"', b'"0001-01-01 00:00:00"']

    def mutate(line):
        roll = rng.random()
        if roll < 0.15 and line:  # bit flips
            data = bytearray(line)
            for _ in range(rng.randint(1, 4)):
                at = rng.randrange(len(data))
                data[at] ^= 1 << rng.randrange(8)
            return bytes(data)
        if roll < 0.3:  # truncation
            return line[: rng.randrange(len(line) + 1)]
        if roll < 0.45:  # splicing two lines
            other = rng.choice(pool)
            return line[: rng.randrange(len(line) + 1)] + other[rng.randrange(len(other) + 1):]
        if roll < 0.55:  # deep nesting where a value goes
            depth = rng.choice((10, 63, 64, 65, 66, 200, 3000))
            nested = b"[" * depth + b"]" * depth if rng.random() < 0.5 else b'{"a":' * depth + b"1" + b"}" * depth
            return line.replace(b":", b":" + nested + b",\"x\":", 1)
        if roll < 0.65:  # a long string or key
            long = b"\xc3\xa9" * rng.randint(1, 40000)
            return line.replace(b'"', b'"' + long, rng.randint(1, 3))
        if roll < 0.75:  # invalid UTF-8
            at = rng.randrange(len(line) + 1)
            bad = rng.choice((b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xe2\x82", b"\xc0\xaf"))
            return line[:at] + bad + line[at:]
        if roll < 0.9:  # another value for a key
            at = line.find(b":", rng.randrange(len(line) + 1))
            if at < 0:
                return line
            end = line.find(b",", at)
            return line[: at + 1] + rng.choice(tokens) + (line[end:] if end >= 0 else b"}")
        at = rng.randrange(len(line) + 1)  # a structural byte
        return line[:at] + bytes([rng.choice(b' {}[]:,"\\0123456789.eE+-ntfu\n\t\x00')]) + line[at:]

    def use(result):
        columns, rows, numbers, lines, slow = result
        assert 0 <= rows <= lines and all(0 <= at < lines for at, _ in slow)
        copy_columns = []
        for kind, (nulls, validity, values, data) in zip(config["kinds"] + "j", columns):
            copy_columns.append((kind, validity, values, data, 0))
        _fastparse.encode_copy(copy_columns, rows, 1)
        uuid_at = config["keys"].index("uuid")
        nulls, validity, values, data = columns[uuid_at]
        seen = _fastparse.StringSet()
        seen.add(values, data, validity, 0, rows)
        seen.add(values, data, validity, 0, rows, True)
        len(seen), seen.own()

    deadline = time.monotonic() + config["seconds"]
    rounds = lines_parsed = 0
    while time.monotonic() < deadline:
        chunk = []
        for _ in range(rng.randint(1, 12)):
            line = rng.choice(pool)
            for _ in range(rng.choice((1, 1, 2, 3))):
                line = mutate(line)
            chunk.append(line)
        text = b"\n".join(chunk)
        cut = rng.randrange(len(text) + 1)
        cut = text.rfind(b"\n", 0, cut)
        segments = [text] if cut < 0 else [text[:cut], memoryview(text)[cut + 1:]]
        use(parser.parse(segments, rng.random() < 0.3))
        rounds += 1
        lines_parsed += len(chunk)
    print(rounds, lines_parsed)
""")


def test_the_compiled_parser_survives_hostile_lines_under_sanitizers(tmp_path: Path) -> None:
    build(SOURCE, tmp_path)
    hour = datetime(2025, 7, 1, 10, tzinfo=UTC)
    events = synthetic.generate_hour(hour, project_id=7, seed=5, events=300, variation=0.3)
    lines = REAL_EVENTS.read_bytes().splitlines() + synthetic.encode_lines(events)
    config = {
        "keys": [c.source for c in parse.COLUMNS],
        "kinds": "".join(schema.COMPILED_KINDS[c.kind] for c in parse.COLUMNS),
        "lines": [line.decode("latin-1") for line in lines],
        "seed": 20261204,
        "seconds": FUZZ_SECONDS,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    result = run_sanitized(tmp_path, FUZZ, timeout=FUZZ_SECONDS * 6 + 60)
    assert_clean(result)
    rounds, parsed = map(int, result.stdout.split())
    assert rounds > 500 and parsed > 3000  # the loop really ran


BROKEN = r"""
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdlib.h>
static PyObject *overflow(PyObject *m, PyObject *n) {
    char *p = malloc(8);
    p[PyLong_AsLong(n)] = 1; /* out of bounds for n >= 8 */
    free(p);
    Py_RETURN_NONE;
}
static PyMethodDef methods[] = {{"overflow", overflow, METH_O, ""}, {NULL, NULL, 0, NULL}};
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "broken", "", -1, methods};
PyMODINIT_FUNC PyInit_broken(void) { return PyModule_Create(&module); }
"""


def test_the_harness_reports_what_asan_finds(tmp_path: Path) -> None:
    # the same build and run, on a module with a heap overflow: the report must fail the test
    source = tmp_path / "broken.c"
    source.write_text(BROKEN)
    build(source, tmp_path)
    assert_clean(run_sanitized(tmp_path, "import broken; broken.overflow(4)", timeout=120))
    result = run_sanitized(tmp_path, "import broken; broken.overflow(8)", timeout=120)
    assert result.returncode in (86, 87)  # ASan's or UBSan's exit code: whichever saw the store first
    assert "heap-buffer-overflow" in result.stderr or "runtime error: store to address" in result.stderr
    with pytest.raises(AssertionError):
        assert_clean(result)
