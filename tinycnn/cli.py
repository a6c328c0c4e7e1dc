"""What the recipes share: the common options, config resolution, the data-prepare step, error printing."""
import argparse
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from .config import ConfigError, load_config

__all__ = ["recipe_parser", "config_from_args", "ensure_data", "run_main", "relaunch_multi_cpu"]

CONFIG_HELP = """
Configuration: defaults < --config FILE < --data/--max_epochs < dotted overrides, e.g.
  train.epochs=5  train.optimizer.lr=0.001  stage_channels=[16,32,64]  augment.enabled=false
Values are YAML; 1e-5 is a number. Unknown keys are an error naming the closest valid key.
Keys and defaults: see tinycnn/config.py (DEFAULTS) and recipes/configs/*.yaml.
"""


def recipe_parser(doc: str, default_config: Optional[str] = None) -> argparse.ArgumentParser:
    """An argument parser with the options every config-driven recipe takes."""
    parser = argparse.ArgumentParser(description=doc, epilog=CONFIG_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=default_config,
                        help=f"YAML config file (default: {default_config or 'the built-in defaults'})")
    parser.add_argument("--data", help="a tinycnn-prepare output folder (overrides data.root)")
    parser.add_argument("--max_epochs", "--max-epochs", type=int, dest="max_epochs",
                        help="number of epochs (overrides train.epochs; the original project's flag)")
    parser.add_argument("--no-download", action="store_true", help="never download data; fail if it is missing")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    return parser


def config_from_args(args: argparse.Namespace, extra: Optional[List[str]] = None) -> Dict[str, Any]:
    overrides = ["data.download=false"] if args.no_download else []
    if args.data:
        overrides.append(f"data.root={args.data}")
    if args.max_epochs:
        overrides.append(f"train.epochs={args.max_epochs}")
    return load_config(args.config, [*overrides, *(extra or []), *args.overrides])


def ensure_data(cfg: Dict[str, Any], accelerator=None) -> Path:
    """The shards folder of cfg['data'], prepared first (from data.source, or downloaded) when missing.

    Like torchvision's download=True: one command from a fresh clone to a training run. Under
    several processes only the main one prepares; the others wait for it.
    """
    from .prepare import ensure_prepared

    d = cfg["data"]
    root = Path(d["root"])
    if accelerator is None:
        return ensure_prepared(root, source=d["source"], download=d["download"])
    with accelerator.main_process_first():
        if accelerator.is_main_process:
            ensure_prepared(root, source=d["source"], download=d["download"])
    return root


def run_main(fn) -> int:
    """Run a recipe's main: print known errors in one red line instead of a traceback, exit 2."""
    from rich.console import Console

    from .prepare import PrepareError

    try:
        return fn() or 0
    except KeyboardInterrupt:
        Console(stderr=True).print("[red]interrupted[/red]")
        return 130
    except (ConfigError, FileNotFoundError, KeyError, ValueError, RuntimeError, MemoryError, PrepareError) as e:
        if getattr(sys, "_tinycnn_traceback", False):
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        from rich.markup import escape
        Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/bold red] {escape(str(msg))}", highlight=False)
        return 2


def _accelerate_cpu_processes() -> int:
    """N when this process was started by `accelerate launch --cpu --num_processes N` (N > 1), else 1."""
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() != "true" or "WORLD_SIZE" in os.environ:
        return 1
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            parent = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return 1
    if not any("accelerate" in a for a in parent[:4]):
        return 1
    for i, a in enumerate(parent):
        if a in ("--num_processes", "--num-processes") and i + 1 < len(parent):
            return int(parent[i + 1])
        if a.startswith(("--num_processes=", "--num-processes=")):
            return int(a.split("=", 1)[1])
    return 1


def relaunch_multi_cpu():
    """Make `accelerate launch --num_processes N --cpu script.py` run N processes.

    accelerate's launcher runs a --cpu job as ONE process whatever --num_processes says (its multi-CPU
    path needs mpirun). Here the script re-executes itself under torchrun with N processes on one
    machine; accelerate then sees MULTI_CPU and uses gloo. Other launches are left alone.
    """
    n = _accelerate_cpu_processes()
    if n <= 1:
        return
    print(f"accelerate launch --cpu starts one process; starting {n} CPU processes (gloo) with torchrun",
          file=sys.stderr)
    os.execv(sys.executable, [sys.executable, "-m", "torch.distributed.run", "--standalone",
                              "--nproc_per_node", str(n), *sys.argv])
