"""Device, seeding, versions, hashing and atomic file writes."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import platform
import random
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import DfkdError


def select_device(name: str = "auto") -> torch.device:
    """``auto`` is CUDA when present, else CPU; ``cpu``, ``cuda`` and ``cuda:N`` are checked against this
    machine. Raises :class:`DfkdError` for any other name, or a CUDA device that is not there."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise DfkdError(f"unknown device '{name}'; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise DfkdError(f"device '{name}': no CUDA GPU is available here; use --device cpu or auto")
        if device.index is not None and device.index >= count:
            raise DfkdError(f"device '{name}': this machine has {count} CUDA GPU(s), cuda:0..cuda:{count - 1}")
    elif device.type != "cpu":
        raise DfkdError(f"device '{name}' is not supported; use auto, cpu, cuda or cuda:N")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every RNG the runner draws from, for checkpoints."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    # plain types and tensors only, so checkpoints load with weights_only=True
    state = {"python": random.getstate(), "numpy": [kind, torch.from_numpy(keys.copy()), pos, has_gauss, gauss],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def versions() -> dict[str, str]:
    import timm

    out = {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__}
    try:
        import kornia
        import torchvision

        out["torchvision"] = torchvision.__version__
        out["kornia"] = kornia.__version__
    except ImportError:
        pass
    from . import __version__

    out["dfkd_bench"] = __version__
    return out


def git_commit(here: Path | None = None) -> str | None:
    """The commit of the dfkd-bench checkout (of the repository at ``here``), with ``+dirty`` when it
    has local changes. Changes under ``results/`` (what runs write, not what they run) do not count."""
    here = here or Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":(top)",
                                ":(top,exclude)results"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_model() -> str:
    """The CPU's model name (Linux: the first ``model name`` in ``/proc/cpuinfo``; elsewhere
    :func:`platform.processor`), or ``"unknown cpu"``. Timings and seeded results depend on it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and ":" in line:
                return " ".join(line.split(":", 1)[1].split())
    except OSError:
        pass
    return platform.processor() or "unknown cpu"


def device_name(device: torch.device) -> str:
    """What ran the job, as written to ``summary.json``'s ``device``: ``cuda:<GPU name>``, or on CPU
    ``cpu (<model>, <n> cores, <t> threads, <kernel ISA>)``; the ISA is the one ATen dispatches to
    (``torch.backends.cpu.get_cpu_capability()``, e.g. AVX512, AVX2, DEFAULT), so results made under
    ``ATEN_CPU_CAPABILITY`` overrides say so."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    isa = torch.backends.cpu.get_cpu_capability()
    return f"cpu ({cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, {isa})"


def peak_memory(device: torch.device) -> dict[str, float]:
    """Peak memory, in MiB: ``peak_rss_mb``, the process's resident-set high-water mark so far (its whole
    life; POSIX ``getrusage``; absent where that does not exist), and on CUDA ``peak_cuda_mb``, the most
    memory PyTorch's allocator held on ``device`` since the previous call (``max_memory_allocated``,
    which this call resets, so each epoch's record holds that epoch's peak)."""
    out: dict[str, float] = {}
    try:
        import resource
    except ImportError:  # pragma: no cover (not POSIX)
        pass
    else:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        out["peak_rss_mb"] = round(rss / (2**20 if platform.system() == "Darwin" else 2**10), 1)
    if device.type == "cuda":
        out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        torch.cuda.reset_peak_memory_stats(device)
    return out


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_UMASK = os.umask(0)
os.umask(_UMASK)


def safe_load(path: Path, what: str) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, every failure one :class:`DfkdError` naming
    ``path`` and ``what`` it should be. A file that needs pickled code (a class, a function, a
    malicious payload) is refused in this project's words: torch's own message advises turning
    ``weights_only`` off, which would run that code."""
    path = Path(path)
    if not path.is_file():
        raise DfkdError(f"{what} {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Unsupported global" in str(exc):  # the file names code to run: a class, a function
            raise DfkdError(f"refusing {path}: it is not a plain tensor file (loading it would run pickled code, "
                            f"which this tool never does); re-save the {what} as plain tensors") from None
        # an opcode the safe unpickler does not take: garbage, or a pickle built to run code (never run here)
        raise DfkdError(f"{path} is not a readable {what}: not a plain torch tensor file") from None
    except Exception as exc:  # torch's unpickler raises anything (IndexError, KeyError, ...) on garbage
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise DfkdError(f"{path} is not a readable {what} (truncated or corrupt?): {first}") from None


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """The JSON object in ``path``; :class:`DfkdError` naming the file when it is unreadable, not UTF-8
    JSON, or not an object (``what`` says what the file should be, and what to do)."""
    try:
        value = json.loads(Path(path).read_text())
    except OSError as exc:
        raise DfkdError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        value = None
    if not isinstance(value, dict):
        raise DfkdError(f"{path} is corrupt: not a JSON object ({what})")
    return value


TMP_GLOB = ".*.tmp"  # the temporaries _atomic writes beside their target


def _atomic(path: Path, write) -> None:
    """Write to a temporary file beside ``path`` and rename it over: readers see all or nothing.
    A failed write (disk full, read-only or missing folder) raises :class:`DfkdError` naming ``path``
    and leaves the old file as it was."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise DfkdError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; results are meant to be shared
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise DfkdError(f"cannot write {path}: {exc.strerror or exc}") from None
    except RuntimeError as exc:
        Path(tmp).unlink(missing_ok=True)
        if "PytorchStreamWriter" in str(exc) or "unexpected pos" in str(exc):
            # torch's zip writer reports a failed write (a full disk) this way
            raise DfkdError(f"cannot write {path}: the write failed (is the disk full?)") from None
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    _atomic(path, lambda fh: fh.write(data))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


def atomic_torch_save(path: Path, obj: Any) -> None:
    _atomic(path, lambda fh: torch.save(obj, fh))


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Add one line by rewriting the (small) file and renaming it over: never a torn line."""
    path = Path(path)
    before = path.read_bytes() if path.is_file() else b""
    atomic_write_bytes(path, before + (json.dumps(record, default=str) + "\n").encode())
