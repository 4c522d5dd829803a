"""Every command docs/benchmarks.md shows exists and its flags parse (running them is the GPU's and CI's job)."""
import os
import re
import shlex

import pytest

from bench import ci, plot
from bench.__main__ import _split_default, build_parser

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOC = os.path.join(ROOT, "docs", "benchmarks.md")


def _commands():
    with open(DOC, encoding="utf-8") as f:
        text = f.read()
    lines = [line.split(" #")[0].strip() for block in re.findall(r"```bash\n(.*?)```", text, re.S)
             for line in block.splitlines()]
    spans = re.findall(r"`((?:python -m bench|compute-sanitizer)[^`<]*)`", text)
    return [c for c in lines + spans if c and "error:" not in c]


@pytest.mark.parametrize("command", _commands())
def test_documented_command_parses(command):
    words = shlex.split(command)
    while re.fullmatch(r"[A-Z_]+=\S*", words[0]):   # environment assignments
        words.pop(0)
    if words[0] == "compute-sanitizer":
        words = words[words.index("python"):]
    if words[0] == ".ci/gpu":
        assert os.access(os.path.join(ROOT, ".ci", "gpu"), os.X_OK)
        return
    assert words[:2] == ["python", "-m"], command
    module, argv = words[2], words[3:]
    if module == "bench":
        parser = build_parser()
        parser.parse_args(_split_default(argv, parser)[0])
    else:
        {"bench.plot": plot, "bench.ci": ci}[module].build_parser().parse_args(argv)


def test_the_documents_commands_were_found():
    assert len(_commands()) >= 15
