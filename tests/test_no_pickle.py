"""No pickle anywhere: the sources never unpickle (a static scan), and a resume works with every unpickler broken."""
import pickle
import re
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SOURCES = sorted([*(REPO / "tinycnn").rglob("*.py"), *(REPO / "recipes").rglob("*.py")])

# what loads (or saves for loading) pickles; prose such as "no pickle" or "torch.load," does not match
FORBIDDEN = {
    "import pickle": re.compile(r"^\s*(import\s+([\w.]+\s*,\s*)*_?c?pickle\b|from\s+_?c?pickle\s+import\b)",
                                re.M),
    "pickle.<name>": re.compile(r"\b_?pickle\.[A-Za-z_]"),
    "register_for_checkpointing": re.compile(r"\bregister_for_checkpointing\b"),
    ".load_state(": re.compile(r"\.load_state\s*\("),
    ".save_state(": re.compile(r"\.save_state\s*\("),  # accelerate's: pickles that the next resume would refuse
    "dill": re.compile(r"^\s*(import|from)\s+dill\b|\bdill\.[A-Za-z_]", re.M),
    "cloudpickle": re.compile(r"\bcloudpickle\b"),
    "joblib.load": re.compile(r"\bjoblib\.load\s*\("),
    "allow_pickle=True": re.compile(r"\ballow_pickle\s*=\s*True\b"),
}
TORCH_LOAD = re.compile(r"\btorch\.load\s*\(")


def _call_text(text: str, open_paren: int) -> str:
    """The text of a call from its opening parenthesis to the matching closing one (or the end of the file)."""
    depth = 0
    for i in range(open_paren, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return text[open_paren:i + 1]
    return text[open_paren:]


def violations(text: str):
    """(pattern name, line number) for each way of loading a pickle in `text`."""
    found = [(name, text.count("\n", 0, m.start()) + 1) for name, pattern in FORBIDDEN.items()
             for m in pattern.finditer(text)]
    for m in TORCH_LOAD.finditer(text):
        if not re.search(r"\bweights_only\s*=\s*True\b", _call_text(text, m.end() - 1)):
            found.append(("torch.load( without weights_only=True", text.count("\n", 0, m.start()) + 1))
    return sorted(found, key=lambda f: f[1])


@pytest.mark.parametrize("line", [
    "import pickle", "import os, pickle", "from pickle import loads", "import pickle as p", "import _pickle",
    "x = pickle.loads(b)", "pickle.load(f)", "Unpickler = _pickle.Unpickler",
    "accelerator.register_for_checkpointing(s)", "accelerator.load_state(d)",
    "self.accelerator.load_state (str(d))", "accelerator.save_state(str(d))", "import dill", "dill.loads(b)",
    "import cloudpickle", "joblib.load(p)", "np.load(p, allow_pickle=True)", "torch.load(p)",
    "torch.load(p, map_location='cpu')", "torch.load(p, weights_only=False)",
    "sd = torch.load(\n    path,\n    map_location='cpu',\n)",
])
def test_the_scan_finds_each_way_of_unpickling(line):
    assert violations(f'"""A module."""\n{line}\n'), line


@pytest.mark.parametrize("line", [
    '"""No pickle anywhere; never pickle, torch.load, or load_state."""', "# safetensors: no pickle.",
    "state = load_state(folder)", "save_state(folder, accelerator=a)", "model.load_state_dict(sd)",
    "torch.load(p, weights_only=True)", "sd = torch.load(\n    path, map_location='cpu',\n    weights_only=True)",
    "from .state import load_state", "x = unpickled_count", "spickle.x = 1",
])
def test_the_scan_leaves_prose_and_safe_calls_alone(line):
    assert not violations(f"{line}\n"), line


def test_no_source_unpickles():
    assert len(SOURCES) > 20
    found = [f"{path.relative_to(REPO)}:{line}: {name}" for path in SOURCES
             for name, line in violations(path.read_text(encoding="utf-8"))]
    assert not found, "sources that (may) unpickle:\n" + "\n".join(found)


# ============================================================================= a resume with every unpickler broken

def break_unpicklers(monkeypatch):
    """pickle's and torch's loaders and accelerate's load_state raise: anything that reaches them fails the test."""
    import accelerate
    import accelerate.checkpointing

    def refuse(*args, **kwargs):
        raise AssertionError("a resume reached an unpickler")

    for owner, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load"),
                        (torch.serialization, "load"), (accelerate.Accelerator, "load_state"),
                        (accelerate.checkpointing, "load_accelerator_state")):
        monkeypatch.setattr(owner, name, refuse)


def test_the_broken_unpicklers_do_fail(monkeypatch, tmp_path):
    torch.save({"a": torch.zeros(1)}, tmp_path / "x.pt")
    break_unpicklers(monkeypatch)
    for load in (lambda: torch.load(tmp_path / "x.pt"), lambda: pickle.loads(pickle.dumps(1))):
        with pytest.raises(AssertionError, match="unpickler"):
            load()


def test_load_state_never_unpickles(monkeypatch, tmp_path):
    from test_state import PROGRESS, Run, assert_same_tree

    run = Run("adamw-timm-fused")
    for _ in range(2):
        run.step()
    run.save(tmp_path / "state")
    break_unpicklers(monkeypatch)
    fresh = Run("adamw-timm-fused", seed=1)
    assert fresh.load(tmp_path / "state") == PROGRESS
    assert_same_tree(fresh.optimizer.state_dict(), run.optimizer.state_dict())


@pytest.mark.slow
def test_train_resumes_with_every_unpickler_broken(tiny_shards, tmp_path, monkeypatch, capsys):
    from test_state import tiny_config

    from tinycnn.train import train

    first = train(tiny_config(tiny_shards, "train.epochs=1"), tmp_path / "run", progress=False)
    capsys.readouterr()
    break_unpicklers(monkeypatch)
    more = train(tiny_config(tiny_shards, "train.epochs=2"), tmp_path / "run", resume=True, progress=False)
    assert f"resuming {tmp_path / 'run'} at epoch 1, step {first['steps']}" in capsys.readouterr().out
    assert more["steps"] == 2 * first["steps"] and [r["epoch"] for r in more["history"]] == [2]

