"""What every recipe script (recipes/*.py) does before and around its work.

The order matters: a run checks everything it can before it writes anything.
  1. `relaunch_multi_cpu` / `die_with_launcher`: the process layout, on one machine or several (and no trainer
     outlives its launcher);
  2. `config_from_args`: the typed config, checked key by key (with `--resume`, the run's saved config);
  3. `ensure_data`: the shards exist and match `data.source` (the default folder alone may be downloaded);
  4. `claim_output`: a fresh or resumed output folder, locked for the life of the run (claimed by the global main
     process; a job that torchrun restarts resumes its own folder);
then the recipe's work, and `run_main` turns known errors into one line and exit code 2.
"""
import argparse
import ctypes
import errno
import os
import signal
import socket
import sys
from pathlib import Path
from typing import List, Optional, Tuple

from .config import Config, ConfigError, flatten, load_config

__all__ = ["recipe_parser", "config_from_args", "ensure_data", "claim_output", "release_output", "run_main",
           "relaunch_multi_cpu", "die_with_launcher", "RESUMABLE_KEYS"]

DEFAULT_DATA_ROOT = Config().data.root

# What `--resume` may change: how long the run goes on and how it is read and logged, never what it learns
# from (data, model, optimizer, schedule shape, seed).
RESUMABLE_KEYS = ("train.epochs", "train.max_steps", "train.log_every", "train.eval_every", "train.save_every",
                  "train.save_every_steps",
                  "train.progress_seconds", "data.num_workers", "data.download", "data.skip_bad",
                  "data.cache_dir", "data.cache_max_bytes")

CONFIG_HELP = """
Configuration: defaults < --config FILE < --data/--max_epochs < dotted overrides, e.g.
  train.epochs=5  train.optimizer.lr=0.001  stage_channels=[16,32,64]  augment.enabled=false  model=resnet10t
Values are YAML; 1e-5 is a number. Every key's type and range is checked before anything starts; an unknown
key is an error naming the closest valid key. Keys and defaults: tinycnn/config.py, recipes/configs/*.yaml.
"""


def recipe_parser(doc: str, default_config: Optional[str] = None, *, output_default: Optional[str] = None,
                  resumable: bool = False) -> argparse.ArgumentParser:
    """An argument parser with the options every config-driven recipe takes."""
    parser = argparse.ArgumentParser(description=doc, epilog=CONFIG_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None,
                        help=f"YAML config file (default: {default_config or 'the built-in defaults'})")
    parser.set_defaults(default_config=default_config)
    parser.add_argument("--data", help="a tinycnn-prepare output folder or a URL serving one (overrides data.root)")
    parser.add_argument("--max_epochs", "--max-epochs", type=int, dest="max_epochs",
                        help="number of epochs (overrides train.epochs; the original project's flag)")
    parser.add_argument("--no-download", action="store_true", help="never download data; fail if it is missing")
    parser.add_argument("--output", default=output_default,
                        help="output folder (default: %(default)s). A folder holding an earlier run is never "
                             "written into: the run goes to the next free name (NAME-2, NAME-3, ...)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the results already in --output (only a folder tinycnn wrote: anything else "
                             "is refused and left as it is)")
    if resumable:
        parser.add_argument("--resume", action="store_true",
                            help="continue the run in --output from its saved config and state; only "
                                 + ", ".join(RESUMABLE_KEYS) + " may be changed")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    return parser


def _overrides(args: argparse.Namespace, extra: Optional[List[str]] = None) -> List[str]:
    overrides = ["data.download=false"] if args.no_download else []
    if args.data:
        overrides.append(f"data.root={args.data}")
    if args.max_epochs:
        overrides.append(f"train.epochs={args.max_epochs}")
    return [*overrides, *(extra or []), *args.overrides]


def config_from_args(args: argparse.Namespace, extra: Optional[List[str]] = None) -> Config:
    """The checked config of a recipe's command line; with --resume, the run's saved config.yaml plus the
    overrides that may change on resume (others are refused, naming them)."""
    overrides = _overrides(args, extra)
    if not getattr(args, "resume", False):
        return load_config(args.config or args.default_config, overrides)
    if not args.output:
        raise ConfigError("--resume needs --output RUN: the run folder to continue")
    saved_path = Path(args.output) / "config.yaml"
    if not saved_path.is_file():
        raise ConfigError(f"--resume: {saved_path} not found ({args.output} holds no run to continue; "
                          "start one without --resume)")
    if args.config:
        raise ConfigError(f"--resume continues {args.output} with its saved config.yaml: drop --config")
    saved = load_config(saved_path)
    _refuse_saved_commands(saved, saved_path, overrides)
    cfg = saved.replace(overrides)
    before, after = flatten(saved), flatten(cfg)
    changed = [k for k in after if before.get(k) != after[k] and k not in RESUMABLE_KEYS]
    if changed:
        what = ", ".join(f"{k}={after[k]!r} (saved: {before.get(k)!r})" for k in changed)
        raise ConfigError(f"--resume continues {args.output} as it was configured; {what} would change the run. "
                          f"Only {', '.join(RESUMABLE_KEYS)} may change on resume: start a new run for the rest")
    return cfg


def _refuse_saved_commands(saved: Config, saved_path: Path, overrides: List[str]):
    """A run folder may come from anyone: a `pipe:` value (a shell command) in its config.yaml runs only when
    the user gives it again now (--data 'pipe:...' or KEY=pipe:...), never because it was saved there."""
    given = {item.split("=", 1)[0].strip() for item in overrides if "=" in item}
    for key, value in flatten(saved).items():
        if isinstance(value, str) and value.startswith("pipe:") and key not in given:
            shown = _one_line(value, 100)
            again = f"--data '{shown}'" if key == "data.root" else f"{key}='{shown}'"
            raise ConfigError(f"--resume: {saved_path} reads its data through a command ({shown}); pass {again} "
                              "again to run it")


def _one_line(text: str, limit: int = 300) -> str:
    """`text` on one line, cut to `limit` characters."""
    text = str(text)
    if "\n" in text or "\r" in text:
        text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def ensure_data(cfg: Config, accelerator=None) -> str:
    """cfg.data.root, checked (and prepared when it is missing: from data.source, or downloaded for the default
    folder only). Under several processes the global main process does it first, then the first process of each
    node (whose data folder may be on another disk); the others then only check."""
    from .prepare import ensure_prepared
    from .storage import is_url, read_manifest

    d = cfg.data
    if is_url(d.root):  # nothing to prepare there: check that its manifest can be read, before a run folder exists
        read_manifest(d.root)
        return d.root
    download = d.download and Path(d.root) == Path(DEFAULT_DATA_ROOT)

    def check():
        ensure_prepared(Path(d.root), source=d.source, download=download)

    if accelerator is None:
        check()
    else:  # the global main process prepares; then one process per node (its own disk); then the rest only check
        with accelerator.main_process_first(), accelerator.local_main_process_first():
            check()
    return d.root


def claim_output(folder: str, args: argparse.Namespace, *, what: str = "run", is_main: bool = True,
                 say=print) -> Tuple[Path, object]:
    """The output folder of this run, locked (tinycnn.runs.claim_folder); under several processes the global main
    process (RANK 0, whatever node it is on) claims it and the others learn which one (a fresh name may have been
    chosen).

    Under torchrun's restarts (`--max-restarts`), a restarted job continues its own folder: when
    TORCHELASTIC_RESTART_COUNT > 0 and the folder (or one of its numbered siblings) was claimed by this same job
    (`_job_identity`, recorded in the folder's marker), a recipe that can resume (`args.resume` exists) resumes it
    (args.resume becomes True on every rank) instead of taking the next free name. A folder of any other job is
    never resumed that way.
    """
    from .runs import claim_folder

    lock = None
    chosen = [None, bool(getattr(args, "resume", False))]
    _OUTPUT[0] = folder
    if is_main:
        resume, overwrite = chosen[1], args.overwrite
        restarted = _restarted_folder(Path(folder)) if hasattr(args, "resume") else None
        if restarted is not None:
            folder, resume, overwrite = str(restarted), _has_saved_state(restarted), not _has_saved_state(restarted)
            say(f"torchrun restart {os.environ.get('TORCHELASTIC_RESTART_COUNT')} of this job: "
                + (f"resuming {folder} from its saved state" if resume else
                   f"starting {folder} again (no state was saved before the restart)"))
        path, lock = claim_folder(folder, resume=resume, overwrite=overwrite, what=what, say=say)
        try:
            _record_job(path)
        except BaseException:
            lock.release()
            raise
        chosen = [str(path), resume]
        _OUTPUT[0] = str(path)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate.utils import broadcast_object_list
        broadcast_object_list(chosen, from_process=0)
    if hasattr(args, "resume"):
        args.resume = bool(chosen[1])
    return Path(chosen[0]), lock


# ----------------------------------------------------------------------------- torchrun restarts

_DEFAULT_RUN_ID = "none"  # torchrun's --rdzv-id when none is given: shared by every such job


def _job_identity() -> Optional[dict]:
    """Who this elastic job is, the same for every restart of it: torchrun's run id (a fresh uuid under
    --standalone), and the agent that restarts the workers (host, pid and start time of this process's parent).
    None outside torchrun."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if run_id is None:
        return None
    agent = os.getppid()
    return {"run_id": run_id, "host": socket.gethostname(), "agent_pid": agent, "agent_started": _start_time(agent)}


def _start_time(pid: int) -> Optional[int]:
    """The start time of process `pid` in clock ticks since boot (Linux): a pid with its start time names one
    process, even after the pid is reused."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read(4096).rsplit(b")", 1)[1].split()
        return int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def _same_job(recorded, current: dict) -> bool:
    """True when `recorded` (a folder's job record) names the job `current` describes. On the same host the agent
    must be the same process (so a later job that reuses a run id, or torchrun's default id, never matches); on
    another host (rank 0 moved under a dynamic rendezvous) only an explicit run id can tell."""
    if not isinstance(recorded, dict) or recorded.get("run_id") != current["run_id"]:
        return False
    if recorded.get("host") == current["host"]:
        agent = (current["agent_pid"], current["agent_started"])
        recorded_agent = (recorded.get("agent_pid"), recorded.get("agent_started"))
        return current["agent_started"] is not None and recorded_agent == agent
    return current["run_id"] != _DEFAULT_RUN_ID


def _restarted_folder(folder: Path) -> Optional[Path]:
    """On a torchrun restart: the folder this job claimed before (`folder` or its next free name NAME-2, ...,
    as the first attempt may have taken); None on a first attempt, outside torchrun, or when no folder is this
    job's."""
    from .runs import holds_results

    current = _job_identity()
    if current is None or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) <= 0:
        return None
    candidate, n = folder, 2
    while holds_results(candidate):
        if _same_job(_read_marker(candidate).get("job"), current):
            return candidate
        candidate = folder.with_name(f"{folder.name}-{n}")
        n += 1
    return None


def _has_saved_state(folder: Path) -> bool:
    from .state import has_saved_state

    return has_saved_state(folder / "state")


def _read_marker(folder: Path) -> dict:
    """The folder's marker (.tinycnn-run) as a dict; {} when it is missing or not ours to read."""
    import json

    from .files import read_head
    from .runs import MARKER_NAME, RunFolderError, _open_regular

    try:
        fd = _open_regular(folder / MARKER_NAME, os.O_RDONLY)
    except (OSError, RunFolderError):
        return {}
    try:
        info = json.loads(read_head(fd))
    except ValueError:
        return {}
    finally:
        os.close(fd)
    return info if isinstance(info, dict) else {}


def _record_job(folder: Path):
    """Record this elastic job in the claimed folder's marker, so that a restart of the same job finds it (outside
    torchrun, an earlier record is left: no restart of this run can match it)."""
    import json

    from .runs import MARKER_NAME, _open_regular

    job = _job_identity()
    marker = _read_marker(folder)
    if job is None or "kind" not in marker:
        return
    fd = _open_regular(folder / MARKER_NAME, os.O_WRONLY)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"kind": marker["kind"], "job": job}).encode())
    finally:
        os.close(fd)


def release_output(folder: Path, lock):
    """Release the output folder's lock; a folder left without results (a run that failed before writing
    anything) is removed, so no empty folder stays behind."""
    from .runs import LOCK_NAME, MARKER_NAME, holds_results

    if lock is None:
        return
    lock.release()
    if not holds_results(folder):
        (folder / MARKER_NAME).unlink(missing_ok=True)
        (folder / LOCK_NAME).unlink(missing_ok=True)
        try:
            folder.rmdir()
        except OSError:
            pass


# OSErrors a user causes with the output they choose: a read-only or full disk, a folder without the rights,
# a path through a file, a name too long; said in one line instead of a traceback.
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
_READ_ONLY = {errno.EROFS}
_NO_RIGHTS = {errno.EACCES, errno.EPERM}  # a read-only folder too, but also a file the user may not read
_BAD_PATH = {errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENAMETOOLONG, errno.ELOOP}
_OUTPUT: List[Optional[str]] = [None]  # the output folder claim_output chose (or is claiming), for those messages


def _os_error_message(e: OSError) -> Optional[str]:
    """One line for an OSError the user can act on (None: another kind, left as it is)."""
    where = e.filename if e.filename is not None else (_OUTPUT[0] or "the output folder")
    reason = e.strerror or os.strerror(e.errno or 0)
    if e.errno in _NO_SPACE:
        return f"cannot write to {where}: {reason}: free space or choose another --output"
    if e.errno in _READ_ONLY:
        return f"cannot write to {where}: {reason}: choose another --output"
    if e.errno in _NO_RIGHTS:
        return f"cannot write to or read {where}: {reason}: choose another --output (or fix its permissions)"
    if e.errno in _BAD_PATH:
        return f"{where}: {reason}" + (f" ({e.filename2})" if e.filename2 else "") + ": check the path (--output)"
    return None


def run_main(fn) -> int:
    """Run a recipe's main: print known errors in one red line instead of a traceback, exit 2
    (TINYCNN_TRACEBACK=1 shows the traceback)."""
    from rich.console import Console
    from rich.markup import escape

    from .errors import TinycnnError

    def say(label: str, msg) -> int:
        Console(stderr=True, soft_wrap=True).print(f"{label} {escape(_one_line(msg, 2000))}", highlight=False)
        return 2

    show_traceback = os.environ.get("TINYCNN_TRACEBACK") or getattr(sys, "_tinycnn_traceback", False)
    _OUTPUT[0] = None
    try:
        return fn() or 0
    except KeyboardInterrupt:
        Console(stderr=True).print("[red]interrupted[/red]")
        return 130
    except (TinycnnError, FileNotFoundError, MemoryError) as e:  # what users cause; anything else is a bug
        if show_traceback:
            raise
        from .train import TrainingStopped

        if isinstance(e, TrainingStopped) and int(os.environ.get("RANK", "0")) > 0:
            return 2  # every rank stops with the same message: rank 0 prints it
        msg = e
        label = "[bold yellow]stopped:[/bold yellow]" if isinstance(e, TrainingStopped) else "[bold red]error:[/bold red]"
        return say(label, msg)
    except OSError as e:
        msg = _os_error_message(e)
        if show_traceback or msg is None:
            raise
        return say("[bold red]error:[/bold red]", msg)


def die_with_launcher():
    """Get SIGTERM when the parent process dies (Linux): `accelerate launch` and torchrun die on SIGTERM
    without passing it on, which left the trainer orphaned and training. Our SIGTERM handler then saves
    resumable state and stops. The agent of relaunch_multi_cpu is this process, so it holds there too."""
    if not sys.platform.startswith("linux"):
        return
    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the launcher died before the call above
        os.kill(os.getpid(), signal.SIGTERM)


def _accelerate_launcher_args() -> Optional[List[str]]:
    """The command line of the `accelerate launch --cpu` that started this process; None for any other start
    (already under torchrun, another launcher, no launcher)."""
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() != "true" or "WORLD_SIZE" in os.environ:
        return None
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            parent = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return None
    if not any("accelerate" in a for a in parent[:4]):
        return None
    return parent


def _launcher_option(args: List[str], name: str) -> Optional[str]:
    """The value of `--name` (or `--name-with-dashes`) in a launcher's command line, as `--name V` or `--name=V`."""
    spellings = {f"--{name}", f"--{name.replace('_', '-')}"}
    for i, a in enumerate(args):
        if a in spellings and i + 1 < len(args):
            return args[i + 1]
        key, equals, value = a.partition("=")
        if key in spellings and equals:
            return value
    return None


def _launcher_int(args: List[str], name: str, default: int) -> int:
    value = _launcher_option(args, name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"accelerate launch --{name} {value}: not a whole number") from None


def _accelerate_cpu_processes() -> int:
    """N when this process was started by `accelerate launch --cpu --num_processes N` (N > 1), else 1."""
    args = _accelerate_launcher_args()
    return 1 if args is None else _launcher_int(args, "num_processes", 1)


def _accelerate_cpu_layout() -> Optional[dict]:
    """The process layout an `accelerate launch --cpu` asked for: num_processes (all nodes together, as accelerate
    counts them), num_machines, machine_rank, main_process_ip and main_process_port (accelerate passes the last
    two on as MASTER_ADDR and MASTER_PORT); None when this process was not started that way."""
    args = _accelerate_launcher_args()
    if args is None:
        return None
    machines = _launcher_int(args, "num_machines", 1)
    layout = {"num_processes": _launcher_int(args, "num_processes", 1), "num_machines": machines,
              "machine_rank": _launcher_int(args, "machine_rank", 0),
              "main_process_ip": os.environ.get("MASTER_ADDR") or _launcher_option(args, "main_process_ip"),
              "main_process_port": os.environ.get("MASTER_PORT") or _launcher_option(args, "main_process_port")}
    if machines > 1:
        if layout["num_processes"] % machines or layout["num_processes"] < machines:
            raise ConfigError(f"accelerate launch --num_processes {layout['num_processes']} counts the processes of "
                              f"all {machines} machines: give a multiple of --num_machines {machines}")
        if not 0 <= layout["machine_rank"] < machines:
            raise ConfigError(f"accelerate launch --machine_rank {layout['machine_rank']}: give 0 to {machines - 1} "
                              f"(--num_machines {machines})")
        if not layout["main_process_ip"] or not layout["main_process_port"]:
            raise ConfigError("accelerate launch --num_machines > 1 needs --main_process_ip and --main_process_port "
                              "(the machine of --machine_rank 0)")
    return layout


def _torchrun_options(layout: dict) -> List[str]:
    """The torchrun options for an accelerate CPU layout: one machine alone (--standalone), or this machine's
    part of several (--nnodes, --node_rank, --master_addr, --master_port; static rendezvous on the main machine)."""
    machines = layout["num_machines"]
    if machines <= 1:
        return ["--standalone", "--nproc_per_node", str(layout["num_processes"])]
    return ["--nnodes", str(machines), "--node_rank", str(layout["machine_rank"]),
            "--master_addr", str(layout["main_process_ip"]), "--master_port", str(layout["main_process_port"]),
            "--nproc_per_node", str(layout["num_processes"] // machines)]


def relaunch_multi_cpu():
    """Make `accelerate launch --cpu --num_processes N [--num_machines M --machine_rank R --main_process_ip IP
    --main_process_port P] script.py` run N processes (N/M on each of M machines).

    accelerate's launcher runs a --cpu job as ONE process whatever --num_processes and --num_machines say (its
    multi-CPU path needs mpirun). Here that process becomes torchrun's agent and starts the script under it: N
    processes on one machine (--standalone), or this machine's N/M of a job that spans M machines (torchrun
    --nnodes M --node_rank R --master_addr IP --master_port P, the same command on every machine); accelerate then
    sees MULTI_CPU and uses gloo. Other launches are left alone.
    """
    die_with_launcher()
    layout = _accelerate_cpu_layout()
    if layout is None or (layout["num_processes"] <= 1 and layout["num_machines"] <= 1):
        return
    options = _torchrun_options(layout)
    where = (f"machine {layout['machine_rank']} of {layout['num_machines']}, "
             f"{layout['num_processes'] // layout['num_machines']} processes here" if layout["num_machines"] > 1
             else f"{layout['num_processes']} CPU processes")
    print(f"accelerate launch --cpu starts one process; starting {where} (gloo) with torchrun", file=sys.stderr)
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    # torchrun's agent in this process, as `python -m torch.distributed.run` would run it: torch is imported
    # here already, and a fresh interpreter would import it again (seconds of CPU on every machine)
    try:
        torchrun([*options, *sys.argv])
    except SignalException as e:  # Ctrl-C, SIGTERM: passed on to the processes, which said what they saved
        raise SystemExit(128 + int(e.sigval)) from None
    except ChildFailedError as e:  # they said why; torchrun's table says which (without its traceback)
        print(e.format_msg(), file=sys.stderr)
        raise SystemExit(1) from None
    raise SystemExit(0)
