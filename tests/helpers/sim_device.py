"""A simulated CUDA device on a CPU: CUDA's device rules, enforced on tensors that claim to live there.

A tensor is "on the device" when it carries a mark (the runner's outputs, a model's parameters, what
`torch.xxx(..., device="cuda")` creates, and whatever an op computes from marked tensors). Every torch
call then follows CUDA's rules: an op may not combine a marked tensor with an unmarked one of more than
zero dimensions, and a generator must be on the device of the tensors it draws for. Reads back to the
host (item, tolist, int, .cpu(), ...) are counted, as are tensors made from host data on the device:
each is a synchronization on a real GPU. The data itself stays on the CPU, so everything computes.
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

CUDA = torch.device("cuda", 0)
_MARK = "_nbkit_on_sim_cuda"
READS = {"item", "tolist", "__int__", "__index__", "__bool__", "__float__", "numpy", "cpu"}
# Indexing a CUDA tensor with host indices, and copies between devices, are allowed by CUDA.
LENIENT = {"__getitem__", "__setitem__", "copy_", "__get__", "__set__", "__len__", "__repr__", "__format__",
           "size", "dim", "numel", "element_size", "__hash__", "__eq__", "is_floating_point"}
CREATORS = {"tensor", "as_tensor", "zeros", "ones", "empty", "full", "arange", "eye", "randint", "rand", "randn",
            "zeros_like", "ones_like", "empty_like", "full_like", "linspace", "tril", "triu"}


def on_device(t: torch.Tensor) -> bool:
    return bool(getattr(t, _MARK, False))


def mark(t: torch.Tensor) -> torch.Tensor:
    setattr(t, _MARK, True)
    return t


class SimGenerator(torch.Generator):
    """A CPU generator that says which device it was asked for (torch.Generator(device=...))."""

    def __new__(cls, device=None):
        return super().__new__(cls)

    def __init__(self, device=None):
        super().__init__()
        self._device = torch.device(device or "cpu")

    @property
    def device(self) -> torch.device:
        return self._device


def _is_cuda(device) -> bool:
    return device is not None and torch.device(device).type == "cuda"


class SimulatedCuda(TorchFunctionMode):
    """Use as `with SimulatedCuda() as sim:` (with torch.Generator patched to SimGenerator); `sim.reads`
    counts device->host reads, `sim.uploads` host data put on the device."""

    def __init__(self):
        super().__init__()
        self.reads = 0
        self.uploads = 0
        self.synchronizes = 0
        self._paused = False
        self._real_synchronize = None

    def __enter__(self):
        # The runner contract's synchronize() waits for CUDA's queue: here the queue is the CPU's, already done.
        self._real_synchronize = torch.cuda.synchronize
        torch.cuda.synchronize = self._synchronize
        return super().__enter__()

    def __exit__(self, *exc):
        torch.cuda.synchronize = self._real_synchronize
        return super().__exit__(*exc)

    def _synchronize(self, device=None) -> None:
        self.synchronizes += 1

    @contextlib.contextmanager
    def paused(self):
        """Work that really runs on the CPU (a wrapped runner's own forward pass)."""
        self._paused, before = True, self._paused
        try:
            yield
        finally:
            self._paused = before

    def put(self, module_or_tensor):
        """A model's parameters and buffers (or one tensor) now live on the device."""
        if isinstance(module_or_tensor, torch.Tensor):
            return mark(module_or_tensor)
        for t in list(module_or_tensor.parameters()) + list(module_or_tensor.buffers()):
            mark(t)
        return module_or_tensor

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if self._paused:
            return func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if name == "__get__" and getattr(getattr(func, "__self__", None), "__name__", "") == "device":
            return CUDA if on_device(args[0]) else func(*args, **kwargs)
        if name in ("to", "cuda"):
            return self._move(func, name, args, kwargs)
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        marked = any(on_device(t) for t in tensors)
        if name in READS and marked:
            self.reads += 1
            out = func(*args, **kwargs)
            return out.clone() if name == "cpu" else out
        if name in CREATORS and _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
            self.uploads += name in ("tensor", "as_tensor")
            return mark(func(*args, **kwargs))
        if name not in LENIENT:
            self._check(name, tensors, marked, kwargs.get("generator"))
        out = func(*args, **kwargs)
        lenient_mark = name in LENIENT and not (args and isinstance(args[0], torch.Tensor) and on_device(args[0]))
        if marked and not lenient_mark:
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    mark(t)
        return out

    def _check(self, name: str, tensors: list[torch.Tensor], marked: bool, generator) -> None:
        if marked:
            strays = [t for t in tensors if not on_device(t) and t.dim() > 0]
            if strays:
                raise RuntimeError(f"{name}: Expected all tensors to be on the same device, but found at least two "
                                   f"devices, cuda:0 and cpu! (a cpu tensor of shape {list(strays[0].shape)})")
        if generator is not None:
            want = "cuda" if marked else "cpu"
            if generator.device.type != want:
                raise RuntimeError(f"{name}: Expected a '{want}' device type for generator but found "
                                   f"'{generator.device.type}'")

    def _move(self, func, name, args, kwargs):
        t = args[0]
        target = CUDA if name == "cuda" else kwargs.get("device")
        rest = []
        for a in args[1:]:
            if isinstance(a, (str, torch.device)):
                target = a
            elif isinstance(a, torch.Tensor):
                target = CUDA if on_device(a) else a.device
            else:
                rest.append(a)
        kwargs.pop("device", None)
        out = t.to(*rest, **kwargs) if (rest or kwargs) else t
        if target is None:
            return mark(out if out is not t else t) if on_device(t) else out
        out = out.clone() if out is t else out
        if _is_cuda(target):
            self.uploads += not on_device(t)
            return mark(out)
        self.reads += on_device(t)
        return out
