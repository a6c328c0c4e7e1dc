"""README.md's Python blocks run, top to bottom in one namespace, in a temporary folder, on the CPU.

The only substitutions are the ones in SUBSTITUTIONS (the prepared shards of the README become the 10-class
sample, real or synthetic, prepared once per pytest run; the README's GPU becomes the CPU), so the README shows what
users type and this test checks that it works.
"""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(text: str):
    """(line number, code) of every ```python block."""
    return [(text[:m.start()].count("\n") + 2, m.group(1)) for m in BLOCK.finditer(text)]


def substitutions(sample_shards: Path):
    return {
        '"shards/tiny-imagenet"': repr(str(sample_shards)),
        '"cuda"': '"cpu"',
    }


def test_readme_has_python_blocks():
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 2 and all(code.strip() for _, code in blocks)


@pytest.mark.slow
def test_readme_python_blocks_run(sample_shards, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__readme__"}
    for line, code in python_blocks(README.read_text()):
        for old, new in substitutions(sample_shards).items():
            code = code.replace(old, new)
        try:
            exec(compile(code, f"README.md:{line}", "exec"), namespace)
        except Exception as e:
            pytest.fail(f"README.md block at line {line} fails: {type(e).__name__}: {e}")


def test_clone_command_does_not_nest_the_package():
    # `git clone ... tinycnn` puts tinycnn/tinycnn/ under the parent folder, where `import tinycnn` then
    # finds the checkout (a namespace package) instead of the library
    clones = [target for _, target in re.findall(r"git clone (\S+)(?: (\S+))?", README.read_text())]
    assert clones and all(target and target != "tinycnn" for target in clones), clones
