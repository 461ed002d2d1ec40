"""Input validation shared by every estimator and loss in this package.

Each check raises ``ValueError`` naming the offending argument, so a bad batch
(NaN reward, empty response, wrong shape) stops before it reaches an update
instead of surfacing later as a NaN loss.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Iterator, Mapping, TypeVar

import torch

F = TypeVar("F", bound=Callable)

_MAX_POSITIONS = 5
_validated_on_host = contextvars.ContextVar("validated_on_host", default=False)


@contextlib.contextmanager
def validated_on_host() -> Iterator[None]:
    """Inside, the value checks below (finite, 0/1 masks, non-empty rows) pass device tensors
    without looking: each would copy a flag to the host, one GPU stall per check per
    micro-batch. Only for callers that validated the same values on the host first (the train
    engine checks every sample field before the schedule). Shape checks always run."""
    token = _validated_on_host.set(True)
    try:
        yield
    finally:
        _validated_on_host.reset(token)


def _unchecked(tensor: torch.Tensor) -> bool:
    return _validated_on_host.get() and tensor.device.type != "cpu"


def require_finite(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """Raise ``ValueError("<name> contains NaN/inf at positions ...")`` unless all entries are finite.

    Lists at most the first five bad positions (as index tuples). Returns the tensor unchanged.
    Note: costs one device sync (the ``.all()`` is read on the host).
    """
    if not torch.is_tensor(tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if _unchecked(tensor):
        return tensor
    finite = torch.isfinite(tensor)
    if bool(finite.all()):
        return tensor
    bad = (~finite).nonzero().tolist()
    shown = ", ".join(str(tuple(p)) for p in bad[:_MAX_POSITIONS])
    more = f" and {len(bad) - _MAX_POSITIONS} more" if len(bad) > _MAX_POSITIONS else ""
    raise ValueError(f"{name} contains NaN/inf at positions {shown}{more} (shape {tuple(tensor.shape)})")


def require_nonempty(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """Raise ``ValueError`` when ``tensor`` has no elements (an empty batch)."""
    if tensor.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(tensor.shape)}): the batch has no sequences")
    return tensor


def require_ndim(name: str, tensor: torch.Tensor, ndim: int) -> torch.Tensor:
    """Raise ``ValueError`` unless ``tensor`` has exactly ``ndim`` dimensions."""
    if tensor.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(tensor.shape)}")
    return tensor


def require_same_shape(ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    """Raise ``ValueError`` when any tensor in ``others`` differs in shape from ``ref`` (None is skipped)."""
    for name, t in others.items():
        if t is not None and tuple(t.shape) != tuple(ref.shape):
            raise ValueError(
                f"shape mismatch: {name} has shape {tuple(t.shape)} but {ref_name} has shape {tuple(ref.shape)}"
            )


def as_bool_mask(name: str, mask: torch.Tensor) -> torch.Tensor:
    """Return ``mask`` as a bool tensor; raise ``ValueError`` if it holds values other than 0/1.

    A float mask of weights (e.g. 0.5) would otherwise be silently rounded to 1.
    """
    if mask.dtype == torch.bool:
        return mask
    if _unchecked(mask):
        return mask != 0
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"{name} must contain only 0/1 (or be bool)")
    return mask != 0


def require_rows_nonempty(name: str, mask: torch.Tensor) -> None:
    """Raise ``ValueError`` naming the rows of a [B, T] mask that have no valid token."""
    if _unchecked(mask):
        return
    empty = (~mask.any(dim=-1)).nonzero().flatten().tolist()
    if empty:
        shown = ", ".join(map(str, empty[:_MAX_POSITIONS]))
        raise ValueError(f"{name} has no valid tokens in row(s) {shown}: an all-masked response cannot carry a reward")


def lookup(kind: str, registry: Mapping[str, F], name: str) -> F:
    """``registry[name]``, or ``ValueError`` listing the valid names of this ``kind``."""
    try:
        return registry[name]
    except (KeyError, TypeError):
        valid = ", ".join(sorted(registry))
        raise ValueError(f"unknown {kind} {name!r}; valid names: {valid}") from None
