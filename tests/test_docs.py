"""Every command README.md and docs/*.md show exists and its flags parse (running them is CI's and the GPU's job).
docs/benchmarks.md's `python -m bench` commands are checked by tests/bench/test_docs.py."""
import glob
import os
import re
import shlex

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
# Commands of other programs that the documents show (installing, shells, the reference evaluator).
OTHER = ("pip", "python3", "export", "cd", ".", ".ci/gpu", "evaluator.py", "-c", "pytest", "git", "bash")


def _commands():
    found = []
    for path in DOCS:
        if path.endswith("benchmarks.md"):
            continue
        with open(path, encoding="utf-8") as f:
            text = f.read()
        for block in re.findall(r"```bash\n(.*?)```", text, re.S):
            for command in block.replace("\\\n", " ").splitlines():
                command = command.split(" # ")[0].strip()
                for part in command.split("&&"):
                    part = re.sub(r"\$\([^)]*\)", "0", part).strip()
                    if part and not part.startswith("#"):
                        found.append((os.path.relpath(path, ROOT), part))
    return found


def _program(words):
    """(program, argv) with environment assignments, torchrun's own options and `python -m` unwrapped."""
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
        words = words[1:]
    if words[0] == "torchrun":
        words = ["python"] + words[words.index("-m"):]
    if words[0] == "python" and len(words) > 2 and words[1] == "-m":
        return words[2], words[3:]
    if words[0] == "python":
        return words[1], words[2:]
    return words[0], words[1:]


@pytest.mark.parametrize("doc,command", _commands())
def test_documented_command_parses(doc, command, monkeypatch):
    program, argv = _program(shlex.split(command))
    if program in OTHER or program.startswith("-"):
        return
    if program in ("bench", "flexdit-bench"):
        from bench.__main__ import _split_default, build_parser
        parser = build_parser()
        parser.parse_args(_split_default(argv, parser)[0])
    elif program in ("flexdit-sample", "flexdit.sample"):
        from flexdit.sample import parse_args
        parse_args(argv)
    elif program in ("flexdit-finetune", "flexdit.train"):
        from flexdit.train import parse_args
        parse_args(argv)
    elif program in ("flexdit-eval", "flexdit.eval"):
        from flexdit.eval import build_parser
        build_parser().parse_args(argv)
    elif program == "flexdit.data":
        from flexdit import data
        monkeypatch.setattr(data, "encode_image_folder", lambda *args, **kwargs: 0)
        monkeypatch.setattr(data, "encode_caption_folder", lambda *args, **kwargs: 0)
        assert data.main(argv + ["--device", "cpu"]) == 0
    else:
        pytest.fail(f"{doc}: unknown program {program!r} in {command!r}")


def test_the_documents_commands_were_found():
    docs = {doc for doc, _ in _commands()}
    assert {"README.md", "docs/training.md", "docs/evaluation.md"} <= docs
