"""Rademacher probes as a pure function of (seed, step, parameter, sample).

Counter-based, not stateful: every micro-batch of a step and every process draws
the same z without saving and reloading a generator, and a resumed run draws the
stream it would have drawn.  The global RNG is never touched, so switching
optimizers does not change dropout masks or data order.
"""

from __future__ import annotations

import contextlib
import functools
from typing import NamedTuple

import torch

__all__ = ["Probes", "rademacher_like", "perturb_", "unperturb_", "estimate_dtype"]

_MASK64 = (1 << 64) - 1


def _mix(*words: int) -> int:
    """splitmix64 over the words: a well-spread 63-bit seed from a few small integers."""
    x = 0x9E3779B97F4A7C15
    for w in words:
        x = (x ^ (w & _MASK64)) & _MASK64
        x = (x + 0x9E3779B97F4A7C15) & _MASK64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
        x ^= x >> 31
    return x >> 1


_CHUNK_BYTES = 1 << 17  # random bytes per slice of an in-place perturbation on CPU: 1M probes, scratch in cache
# Elsewhere (GPUs) a slice of the perturbation's round trip ends in a host sync (how many entries it keeps),
# so slices are four times larger there: one sync per 4M entries, about 14 bytes of scratch per entry of a
# slice (56 MB in fp32), where the copy it replaces took 4 bytes per parameter.
_DEVICE_CHUNK_BYTES = 1 << 19


def _chunk_bytes(device: torch.device) -> int:
    return _CHUNK_BYTES if device.type == "cpu" else _DEVICE_CHUNK_BYTES


@functools.lru_cache(maxsize=None)
def _sign_table(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(256, 8): row b holds the eight probes byte b encodes, bit k (lowest first) giving 2·bit − 1."""
    bits = (torch.arange(256, dtype=torch.int16).unsqueeze(-1) >> torch.arange(8, dtype=torch.int16)) & 1
    return (bits * 2 - 1).to(device=device, dtype=dtype)


def _random_bytes(count: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.empty(count, dtype=torch.uint8, device=device).random_(0, 256, generator=generator)


def rademacher_like(t: torch.Tensor, generator: torch.Generator, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A tensor of ±1 with the shape and device of ``t``, in ``dtype`` (default ``t``'s).

    int8 probes take a quarter of the memory of fp32 ones and hold ±1 exactly.
    """
    # Eight probes per random byte, looked up in one gather: one draw per element is what
    # made the probes a visible share of a Hessian step (3× slower for a model's worth).
    n = t.numel()
    z = _signs(_random_bytes((n + 7) // 8, generator, t.device), dtype or t.dtype)
    return z.view(-1)[:n].view(t.shape)


def _signs(random_bytes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The eight probes each random byte encodes, in ``dtype``: eight entries per byte, in byte order."""
    table = _sign_table(random_bytes.device, dtype)
    if dtype.itemsize == 1:
        # A byte's eight one-byte probes are one int64: a gather of words, not of rows.
        return table.view(torch.int64).view(-1)[random_bytes.long()].view(dtype)
    return table[random_bytes.long()]


def _signed_slices(t: torch.Tensor, random_bytes: torch.Tensor, alpha: float):
    """(a slice of flat ``t``, alpha·z on it) in turn, z the probes ``random_bytes`` encode (eight a byte).

    Each from a table of ±alpha in ``t``'s dtype: no parameter-sized probe, no int8-to-float conversion over
    the whole tensor, and the scratch stays in cache.  A slice's alpha·z is valid until the next is made.
    """
    n = t.numel()
    flat = t.view(-1)
    table = _sign_table(t.device, t.dtype) * alpha
    chunk = _chunk_bytes(t.device)
    scratch = table.new_empty((min(chunk, random_bytes.numel()), 8))
    for start in range(0, random_bytes.numel(), chunk):
        stop = min(start + chunk, random_bytes.numel())
        signs = torch.index_select(table, 0, random_bytes[start:stop].long(), out=scratch[: stop - start])
        lo, hi = start * 8, min(n, stop * 8)
        yield flat[lo:hi], signs.view(-1)[: hi - lo]


class RoundTrip(NamedTuple):
    """What :func:`unperturb_` gives a tensor back from: its probes' random bytes (an eighth of a byte an
    entry) and, per slice, None, (positions, values) of the entries the subtraction does not give back, or
    the slice's values."""

    random_bytes: torch.Tensor
    kept: list


def perturb_(t: torch.Tensor, generator: torch.Generator, alpha: float) -> RoundTrip:
    """``t += alpha·z`` for the z ``rademacher_like(t, generator)`` would draw, bit for bit, without making z,
    returning what :func:`unperturb_` needs to give ``t`` back bit for bit.

    Subtracting alpha·z again gives t back except where adding it rounded away low bits of t: entries much
    smaller than alpha, and round-half ties.  Those are found here, slice by slice, by making the round
    trip, and kept; where more than a third of a slice is off, the slice's values are.  So no copy of t is
    made where its entries are mostly above alpha (on MiniLM at a finite-difference step's ε, 0.3 % are
    kept).  For contiguous fp32 and fp64 tensors.
    """
    random_bytes = _random_bytes((t.numel() + 7) // 8, generator, t.device)
    kept = []
    bits = torch.int64 if t.dtype == torch.float64 else torch.int32
    size = min(t.numel(), _chunk_bytes(t.device) * 8)
    before, back, off = t.new_empty(size), t.new_empty(size), torch.empty(size, dtype=torch.bool, device=t.device)
    for part, signs in _signed_slices(t, random_bytes, alpha):
        n = part.numel()
        before[:n].copy_(part)
        part.add_(signs)
        torch.sub(part, signs, out=back[:n])
        # Bit patterns, not values: −0.0 comes back as +0.0, and a NaN may change its payload.
        positions = _positions(torch.ne(back[:n].view(bits), before[:n].view(bits), out=off[:n]))
        if positions.numel() == 0:
            kept.append(None)
        elif 3 * positions.numel() > n:
            kept.append(before[:n].clone())
        else:
            kept.append((positions, before[:n][positions]))
    return RoundTrip(random_bytes, kept)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """``mask.nonzero()`` of a sparse 1-D boolean mask, eight entries a word first (0.4 ms for 2^20 entries
    with 0.3 % set, against 1.5 ms, on this project's 2-core machine)."""
    if mask.numel() % 8:
        return mask.nonzero().squeeze(1)
    words = mask.view(torch.int64).nonzero().squeeze(1)
    word, entry = mask.view(-1, 8)[words].nonzero(as_tuple=True)
    return words[word] * 8 + entry


def unperturb_(t: torch.Tensor, alpha: float, record: RoundTrip) -> torch.Tensor:
    """``t −= alpha·z``, made exactly as :func:`perturb_`'s round trip made it, then its record put back."""
    for (part, signs), kept in zip(_signed_slices(t, record.random_bytes, alpha), record.kept):
        part.sub_(signs)
        if isinstance(kept, torch.Tensor):
            part.copy_(kept)
        elif kept is not None:
            part.index_copy_(0, *kept)
    return t


class Probes:
    """The Rademacher probes of one step: z for (parameter index, sample) from (seed, step)."""

    def __init__(self, seed: int, step: int = 0):
        self.seed, self.step = int(seed), int(step)
        self._generators: dict[torch.device, torch.Generator] = {}
        self._kept: dict[tuple[int, int], torch.Tensor] | None = None

    @contextlib.contextmanager
    def kept(self):
        """Inside, each int8 probe is drawn once and kept (an int8 copy of the parameters at most):
        the chunks of a micro-batch share their probes instead of drawing them again each."""
        self._kept = {}
        try:
            yield
        finally:
            self._kept = None

    def _generator(self, index: int, device: torch.device, sample: int) -> torch.Generator:
        generator = self._generators.get(device)
        if generator is None:
            generator = self._generators[device] = torch.Generator(device=device)
        return generator.manual_seed(_mix(self.seed, self.step, index, sample))

    def draw(self, index: int, like: torch.Tensor, sample: int = 0, dtype: torch.dtype = torch.int8) -> torch.Tensor:
        keep = self._kept is not None and dtype == torch.int8 and not is_dtensor(like)
        if keep and (index, sample) in self._kept:
            return self._kept[index, sample]
        z = self._draw(index, like, sample, dtype)
        if keep:
            self._kept[index, sample] = z
        return z

    def _draw(self, index: int, like: torch.Tensor, sample: int, dtype: torch.dtype) -> torch.Tensor:
        generator = self._generator(index, like.device, sample)
        if is_dtensor(like):
            # A shard of a sharded parameter (FSDP2) takes its slice of the probe one process would
            # draw for the whole tensor: every rank draws it whole and keeps its own part.
            from torch.distributed.tensor import distribute_tensor

            whole = rademacher_like(torch.empty(like.shape, device=like.to_local().device), generator, dtype)
            return distribute_tensor(whole, like.device_mesh, like.placements, src_data_rank=None)
        return rademacher_like(like, generator, dtype)

    def draw_rows(self, index: int, like: torch.Tensor, rows: torch.Tensor, sample: int = 0) -> torch.Tensor:
        """``draw(index, like, sample)[rows]`` (int8), without the whole probe where each row is whole bytes."""
        width = like[0].numel() if like.dim() else 0
        if is_dtensor(like) or width % 8:
            return self.draw(index, like, sample).index_select(0, rows)
        random_bytes = _random_bytes(like.numel() // 8, self._generator(index, like.device, sample), like.device)
        picked = random_bytes.view(like.shape[0], width // 8).index_select(0, rows)
        return _signs(picked, torch.int8).view(len(rows), *like.shape[1:])

    def perturb_(self, index: int, t: torch.Tensor, alpha: float, sample: int = 0):
        """``t += alpha·z`` for parameter ``index``'s probe, as ``t.add_(draw(index, t, sample), alpha=alpha)``,
        returning the record :meth:`restore_` gives ``t`` back from, bit for bit (:func:`perturb_`'s; a copy of
        ``t`` where the slices cannot be taken)."""
        if not _sliceable(t):
            saved = t.detach().clone()
            t.add_(self.draw(index, t, sample, torch.int8), alpha=alpha)
            return saved
        return perturb_(t, self._generator(index, t.device, sample), alpha)

    def restore_(self, t: torch.Tensor, alpha: float, record) -> torch.Tensor:
        """Undo :meth:`perturb_` (the same ``alpha``) exactly."""
        if isinstance(record, torch.Tensor):
            return t.copy_(record)
        return unperturb_(t, alpha, record)


def _sliceable(t: torch.Tensor) -> bool:
    # bf16's add_ rounds εz differently in its vectorised and scalar loops: the plain way there.
    return not is_dtensor(t) and t.is_contiguous() and t.dtype in (torch.float32, torch.float64)


def is_dtensor(t) -> bool:
    """A DTensor (a parameter sharded by FSDP2), told apart without importing torch.distributed."""
    return type(t).__name__ == "DTensor"


def estimate_dtype(p: torch.Tensor) -> torch.dtype:
    """Estimates are kept in fp32, or fp64 for fp64 parameters: never below fp32."""
    return torch.promote_types(p.dtype, torch.float32)
