"""tinycnn weights in the Hugging Face Hub layout that timm reads: `config.json` + `model.safetensors`.

    tinycnn.export_hub("checkpoints/recommended/best.safetensors", "tinycnn-tiny-imagenet")
    # then, in any code that has imported tinycnn (which registers the architecture with timm):
    model = timm.create_model("local-dir:tinycnn-tiny-imagenet", pretrained=True)

    tinycnn.push_hub("checkpoints/recommended/best.safetensors", "user/tinycnn-tiny-imagenet")
    model = timm.create_model("hf-hub:user/tinycnn-tiny-imagenet", pretrained=True)

The folder is written by timm's own `save_for_hf` (and pushed by `push_to_hf_hub`): config.json holds
the architecture, `model_args` (widths, depths, class count: what timm passes back to the model),
`pretrained_cfg` (input size, mean/std) and `label_names` (the wnids), so the folder rebuilds the exact
model with timm alone. Both need huggingface_hub (`pip install "tinycnn[hub]"`); loading a folder with
`local-dir:` needs timm >= 1.0.16.
"""
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

from .files import NotOursError, install_folder, umask_mode
from .weights import HUB_CONFIG, HUB_WEIGHTS, WeightsError, load_model, read_json_file, read_metadata

__all__ = ["export_hub", "push_hub"]

HUB_README = "README.md"  # the model card push_to_hf_hub writes beside the config and weights
EXPORTED_FILES = frozenset({HUB_CONFIG, HUB_WEIGHTS, HUB_README})


def _require_hf_hub():
    if importlib.util.find_spec("huggingface_hub") is None:
        raise WeightsError('exporting to the Hugging Face layout needs huggingface_hub: pip install "tinycnn[hub]"')


def _hub_description(meta: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(model_config, model_args) for timm's save_for_hf, from read_metadata's dict."""
    # explicit, so models built without timm.create_model (no recorded factory args) export the same
    architecture = (meta["model_args"] if "model_args" in meta
                    else {k: meta[k] for k in ("stage_channels", "stage_repeats")})
    model_args = {**architecture, "num_classes": meta["num_classes"], "in_chans": meta["in_chans"]}
    model_config: Dict[str, Any] = {"tinycnn": {"version": meta.get("tinycnn_version"), "extra": meta.get("extra") or {}}}
    if meta.get("classes"):
        model_config["label_names"] = list(meta["classes"])
        if meta.get("class_names"):
            model_config["label_descriptions"] = dict(zip(meta["classes"], meta["class_names"]))
    return model_config, model_args


def _model_card(meta: Dict[str, Any], num_params: int, repo_id: str) -> Dict[str, Any]:
    """What timm's generate_readme puts in the pushed README.md (the model card)."""
    details = {
        "Model Type": "Image classification",
        "Architecture": (f"{meta['architecture']}: channels {meta['stage_channels']}, blocks per stage "
                         f"{meta['stage_repeats']}" if "stage_channels" in meta else meta["architecture"]),
        "Params (M)": round(num_params / 1e6, 3),
        "Image size": "x".join(str(s) for s in meta["input_size"][1:]),
        "Classes": meta["num_classes"],
    }
    details.update({k: v for k, v in (meta.get("extra") or {}).items() if isinstance(v, (int, float, str))})
    usage = ("```python\nimport timm, tinycnn  # tinycnn registers the architecture\n\n"
             f"model = timm.create_model('hf-hub:{repo_id}', pretrained=True).eval()\n```\n")
    return {"details": details, "usage": usage, "license": "apache-2.0",
            "tags": ["image-classification", "timm", "tinycnn"]}


def export_hub(weights: Union[str, Path], out_dir: Union[str, Path]) -> Path:
    """Write `weights` (a tinycnn .safetensors file or model folder) as a timm model folder at `out_dir`.

    The folder is written beside `out_dir` and renamed into place: an interrupted export leaves the
    previous one (or nothing). An existing `out_dir` must be an empty folder or an earlier export
    (see _replaceable): nothing else is ever replaced.
    """
    _require_hf_hub()
    from timm.models import save_for_hf

    out_dir = Path(out_dir)
    if os.path.lexists(out_dir) and not _replaceable(out_dir):
        raise WeightsError(f"{out_dir} exists and is not an exported model folder: give a new or empty --out")
    meta = read_metadata(weights)
    model = load_model(weights)
    model_config, model_args = _hub_description(meta)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    try:
        save_for_hf(model, tmp, model_config=model_config, model_args=model_args, safe_serialization=True)
        for f in tmp.iterdir():
            f.chmod(umask_mode())
        tmp.chmod(umask_mode(0o777))
        _swap_into_place(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def push_hub(weights: Union[str, Path], repo_id: str, *, private: bool = False, token: Optional[str] = None,
             commit_message: str = "Add tinycnn weights") -> str:
    """Push `weights` to the Hugging Face Hub repository `repo_id` (created if needed); returns the commit URL.

    The same files as export_hub, plus a model card when the repository has none; the token is
    huggingface_hub's (`hf auth login` or HF_TOKEN) unless given.
    """
    _require_hf_hub()
    from timm.models import push_to_hf_hub

    meta = read_metadata(weights)
    model = load_model(weights)
    model_config, model_args = _hub_description(meta)
    card = _model_card(meta, sum(p.numel() for p in model.parameters()), repo_id)
    commit = push_to_hf_hub(model, repo_id, commit_message=commit_message, token=token, private=private,
                            model_config=model_config, model_args=model_args, model_card=card,
                            safe_serialization=True)  # no pickle (timm's default also pushes pytorch_model.bin)
    return str(getattr(commit, "commit_url", commit))


def _replaceable(folder: Path) -> bool:
    """Whether `folder` may be replaced by an export: an empty folder, or one tinycnn-export wrote.

    An export is config.json and model.safetensors (and README.md when pushed) as plain files, nothing
    else, with a config.json that tinycnn wrote (a JSON object with an architecture and a "tinycnn"
    entry). Symlinks are never followed: a symlinked folder or file inside makes it not replaceable.
    """
    if folder.is_symlink() or not folder.is_dir():
        return False
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return False
    if not entries:
        return True
    names = {e.name for e in entries}
    if not {HUB_CONFIG, HUB_WEIGHTS} <= names <= EXPORTED_FILES:
        return False
    if not all(e.is_file(follow_symlinks=False) for e in entries):
        return False
    try:
        config = read_json_file(folder / HUB_CONFIG, "not a timm model config")
    except WeightsError:
        return False
    return isinstance(config, dict) and isinstance(config.get("architecture"), str) and "tinycnn" in config


def _swap_into_place(new: Path, target: Path):
    """Rename `new` onto `target`, replacing an earlier export there, checked again (it may have changed since
    export_hub looked): files.install_folder."""
    try:
        install_folder(new, target, _replaceable)
    except NotOursError:
        raise WeightsError(f"{target} is not an exported model folder (it changed while exporting): give a new "
                           "or empty --out") from None
