"""Weight layouts that make CPU decoding faster; applied to a finished model from outside.

Decoding streams every weight once per step for only a few rows (batch 1-8), so on a CPU its
speed is set by how the BLAS reads the matrices, not by arithmetic. Two changes, both measured in
docs/benchmarks.md ("Generation (CPU)"):

- :func:`lay_out_weights_for_decoding`: every matrix stored transposed (column-major; same shape
  and values) in one mapping advised for transparent huge pages.
- :func:`pack_linears`: every ``nn.Linear`` replaced by a :class:`PackedLinear`, which can hold a
  copy of its weight in MKL's packed GEMM layout for a given number of rows. MKL's ``sgemm``
  otherwise re-packs the weight at every call, a second pass over it; with the copy made once,
  batches of 2-8 rows decode 1.3-1.5x faster. At one row the unpacked kernel (a matrix-vector
  product) is the faster one, so one row stays unpacked. The copy doubles the weights' memory,
  so it is skipped where it would not fit in half of the memory still available.

Both keep every parameter's value, its name in ``state_dict`` and the output layer tied to the
token embedding.
"""

from __future__ import annotations

import mmap
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

_HUGE_PAGE = 2 << 20


def lay_out_weights_for_decoding(model: nn.Module) -> mmap.mmap | None:
    """Lay a CPU model's parameters out for decoding.

    - Matrices are stored transposed (column-major; same shape and values). ``F.linear`` computes
      x @ W.T, and with W.T contiguous the CPU BLAS takes its plain row-major kernel, which at the
      few rows of a decode step is 1.5-2x faster for the output layer than the transposed-operand
      kernel. Embedding lookups read a row with a stride instead, once per token: negligible.
    - Everything lives in one anonymous mapping advised for transparent huge pages (Linux):
      with 4 KiB pages the TLB misses cost 10-20% on the machines measured. Best effort: on any
      other system, or if the kernel refuses, the weights are only re-laid.
    - The int8 weights of :class:`~gpt2cli.quantize.Int8Linear` layers (buffers) move into the
      same mapping as they are, row-major: their fused one-row product reads them by rows.

    Returns the mapping (kept alive by the tensors that view it) or None."""
    from gpt2cli.quantize import Int8Linear

    params = [p for p in model.parameters() if p.device.type == "cpu"]
    int8_weights = [m.weight_int8 for m in model.modules() if isinstance(m, Int8Linear) and m.weight_int8.device.type == "cpu"]
    tensors = [(p, p.dim() == 2) for p in params] + [(w, False) for w in int8_weights]  # (tensor, store transposed)
    sizes = [-(-t.numel() * t.element_size() // 64) * 64 for t, _ in tensors]  # 64-byte aligned slots
    flat = buf = None
    if sys.platform == "linux" and hasattr(mmap, "MADV_HUGEPAGE") and sum(sizes) >= _HUGE_PAGE:
        try:
            buf = mmap.mmap(-1, sum(sizes) + _HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            buf.madvise(mmap.MADV_HUGEPAGE)
            flat = torch.frombuffer(buf, dtype=torch.uint8)
        except (OSError, ValueError):
            flat = buf = None
    offset = -flat.data_ptr() % _HUGE_PAGE if flat is not None else 0  # start on a huge-page boundary
    with torch.no_grad():
        for (t, transpose), size in zip(tensors, sizes, strict=True):
            if flat is not None:
                n = t.numel() * t.element_size()
                storage = flat[offset : offset + n].view(t.dtype)
                offset += size
            else:
                storage = torch.empty(t.numel(), dtype=t.dtype)
            # A matrix (rows, cols) is stored as its transpose, (cols, rows) row-major.
            view = storage.view(t.shape[1], t.shape[0]).t() if transpose else storage.view(t.shape)
            view.copy_(t.data)
            t.data = view
    return buf


def mkl_packing_available() -> bool:
    """True where torch was built with MKL and has its packed-GEMM ops (x86 builds)."""
    mkl_ops = torch.ops.mkl
    return (
        torch.backends.mkl.is_available()
        and hasattr(mkl_ops, "_mkl_reorder_linear_weight")
        and hasattr(mkl_ops, "_mkl_linear")
    )


def available_memory_bytes() -> int | None:
    """Memory the system can still give this process without swapping (Linux ``MemAvailable``;
    elsewhere free pages), or None where neither can be read."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def pack_for_decoding(linears: list[PackedLinear], rows: int) -> None:
    """Pack ``linears`` for decode steps of ``rows`` rows, or leave them unpacked: one row (the
    matrix-vector kernel is faster unpacked), or copies that would take more than half of the
    memory still available (a speed-up must not push a large model into swap). Copies that
    already exist are replaced in place, so they need no new room."""
    already = any(m.packed is not None for m in linears)
    needed = sum(m.weight.numel() * m.weight.element_size() for m in linears)
    available = available_memory_bytes()
    fits = already or available is None or 2 * needed <= available
    for linear in linears:
        linear.pack(rows if rows >= 2 and fits else None)


class PackedLinear(nn.Module):
    """``nn.Linear``'s computation, optionally through a copy of the weight in MKL's packed layout.

    ``weight`` and ``bias`` are the wrapped layer's own parameters (same objects: a tied weight
    stays tied, and ``state_dict`` names are unchanged). :meth:`pack` makes the packed copy for
    inputs of a given number of rows; inputs with any other number of rows, and every input while
    nothing is packed, go through ``F.linear`` as before. The packed copy is an fp32 CPU
    inference-only cache: it is not a parameter, is never saved, and is dropped by
    :meth:`pack` with ``None``."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.packed: torch.Tensor | None = None
        self.packed_rows = 0
        self.packed_version = -1  # the weight's version counter when it was packed

    def pack(self, rows: int | None) -> None:
        """Pack the weight for inputs of ``rows`` rows (all leading dimensions flattened), or drop
        the packed copy (None). Packing again for the same rows and unchanged weights is free."""
        if rows is None:
            self.packed, self.packed_rows = None, 0
        elif rows != self.packed_rows or self.weight._version != self.packed_version:
            self.packed = torch.ops.mkl._mkl_reorder_linear_weight(self.weight.detach(), rows)
            self.packed_rows, self.packed_version = rows, self.weight._version

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        training = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        if self.packed is None or x.numel() // self.in_features != self.packed_rows or training:
            return F.linear(x, self.weight, self.bias)  # the packed op has no backward
        if self.weight._version != self.packed_version:
            # Changed in place since it was packed (load_state_dict, an optimizer step): the copy is stale.
            self.pack(self.packed_rows)
        return torch.ops.mkl._mkl_linear(x, self.packed, self.weight, self.bias, self.packed_rows)

    def __getstate__(self) -> dict:
        """Pickled and deep-copied without the packed copy (an MKL-opaque tensor, which neither
        can handle); it is made again by the next :meth:`pack`."""
        state = self.__dict__.copy()
        state.update(packed=None, packed_rows=0, packed_version=-1)
        return state

    def extra_repr(self) -> str:
        packed = f", packed for {self.packed_rows} rows" if self.packed is not None else ""
        return f"in_features={self.in_features}, out_features={self.out_features}{packed}"


def pack_linears(model: nn.Module) -> list[PackedLinear]:
    """Replace every ``nn.Linear`` of a CPU fp32 model by a :class:`PackedLinear` (nothing packed
    yet) and return them. Call only where :func:`mkl_packing_available`."""
    wrapped = []
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                packed = PackedLinear(child)
                setattr(module, name, packed)
                wrapped.append(packed)
    return wrapped
