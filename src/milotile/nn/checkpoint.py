"""Checkpoints that carry their contract: architecture, config, weights, preprocessing, version."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from milotile.errors import InputError
from milotile.nn import registry

log = logging.getLogger(__name__)

__all__ = ["save_checkpoint", "load_checkpoint", "build_model", "milotile_version", "FORMAT"]

#: marker stored in every checkpoint written by milotile
FORMAT = "milotile-checkpoint-1"


def milotile_version() -> str:
    """The installed milotile version (``"unknown"`` when not installed)."""
    try:
        from importlib.metadata import version

        return version("milotile")
    except Exception:  # pragma: no cover - not installed
        return "unknown"


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    # DDP / DataParallel / torch.compile wrappers keep the real module in .module / ._orig_mod
    for attr in ("module", "_orig_mod"):
        inner = getattr(model, attr, None)
        if isinstance(inner, torch.nn.Module):
            return _unwrap(inner)
    return model


def _plain_data(v: Any) -> Any:
    """Make ``v`` loadable with ``torch.load(weights_only=True)``: numpy -> Python, paths -> str."""
    if isinstance(v, torch.Tensor):
        return v.detach().cpu()
    if isinstance(v, dict):
        return {str(k) if not isinstance(k, (int, str)) else k: _plain_data(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        seq = [_plain_data(x) for x in v]
        return tuple(seq) if isinstance(v, tuple) else seq
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    if isinstance(v, os.PathLike):
        return os.fspath(v)
    tolist = getattr(v, "tolist", None)  # numpy arrays and scalars
    if callable(tolist):
        return tolist()
    raise TypeError(f"cannot store a {type(v).__name__} in a checkpoint (plain data only)")


def save_checkpoint(
    path: str | os.PathLike[str],
    *,
    arch: str,
    config: dict[str, Any],
    model: torch.nn.Module,
    contract: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
    epoch: int | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint atomically (temporary file in the same folder, then ``os.replace``).

    Parameters
    ----------
    path : path-like
        Destination ``.pt`` file; parent folders are created.
    arch : str
        Registered architecture name (see :mod:`milotile.nn.registry`).
    config : dict
        Keyword arguments that rebuild the model with ``registry.create(arch, **config)``.
    model : torch.nn.Module
        The model whose ``state_dict`` is stored (wrappers such as DDP are unwrapped).
    contract : dict
        Everything inference needs without repeating training flags (geometry, preprocessing,
        normalisation statistics, ...). Must be picklable plain data.
    optimizer : torch.optim.Optimizer, optional
        Stored for resuming.
    epoch : int, optional
        Number of finished epochs.
    extra : dict, optional
        Any further plain data (scheduler state, RNG state, metrics).

    Returns
    -------
    pathlib.Path
        The written file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in _unwrap(model).state_dict().items()}
    ckpt: dict[str, Any] = {
        "format": FORMAT,
        "arch": str(arch),
        "config": _plain_data(dict(config)),
        "state_dict": state,
        "contract": _plain_data(dict(contract)),
        "epoch": epoch,
        "milotile_version": milotile_version(),
        "torch_version": str(torch.__version__),
    }
    if optimizer is not None:
        ckpt["optimizer"] = optimizer.state_dict()
    if extra:
        ckpt["extra"] = _plain_data(dict(extra))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(ckpt, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    log.debug("saved checkpoint %s (arch %s, epoch %s)", path, arch, epoch)
    return path


def load_checkpoint(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Read a milotile checkpoint.

    Parameters
    ----------
    path : path-like
        A file written by :func:`save_checkpoint`.
    map_location : str or torch.device
        Where tensors are loaded.

    Returns
    -------
    dict
        Keys ``arch, config, state_dict, contract, epoch, milotile_version, torch_version`` and,
        when saved, ``optimizer`` and ``extra``.

    Raises
    ------
    InputError
        When the file is missing, unreadable, or not a milotile checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint file {str(path)!r} does not exist.")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means: not a checkpoint we can trust
        raise InputError(f"checkpoint file {str(path)!r} {_load_failure(exc)}.") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT or "arch" not in ckpt:
        raise InputError(
            f"checkpoint file {str(path)!r} is not a milotile checkpoint (no 'format'/'arch' record)."
        )
    return ckpt


def _load_failure(exc: BaseException) -> str:
    """One clause saying why ``torch.load`` refused a file (torch's own text is several lines of advice)."""
    text = str(exc)
    if "Unsupported global" in text:
        return ("holds Python objects besides tensors and plain data, so it is not a checkpoint milotile wrote "
                "and is not loaded (unpickling it could run code)")
    return f"is not a PyTorch checkpoint (a truncated file or another kind of file; {type(exc).__name__})"


def build_model(ckpt: dict[str, Any] | str | os.PathLike[str], map_location: str | torch.device = "cpu") -> torch.nn.Module:
    """Rebuild the model stored in a checkpoint, load its weights and put it in eval mode.

    Parameters
    ----------
    ckpt : dict or path-like
        A dict from :func:`load_checkpoint`, or a path to one.
    map_location : str or torch.device
        Used when ``ckpt`` is a path.

    Returns
    -------
    torch.nn.Module
        The model in ``eval()`` mode, on the CPU.
    """
    if not isinstance(ckpt, dict):
        ckpt = load_checkpoint(ckpt, map_location=map_location)
    model = registry.create(ckpt["arch"], **ckpt.get("config", {}))
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        raise InputError(
            f"checkpoint weights do not match architecture {ckpt['arch']!r} with config {ckpt.get('config')}: {exc}"
        ) from exc
    model.eval()
    return model
