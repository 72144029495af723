"""Reading a checkpoint file from a stranger: the container is checked before torch sees it, and its
pickle is unpickled by `GuardedUnpickler`, which admits only checkpoint data and checks arguments.

Container: a regular file (no FIFO, device or directory), either torch's zip (members under one
prefix, stored not compressed, no links, no overlaps, sizes within the file) or the bare pickle of
torch < 1.6. torch's pre-0.4 tar format is refused: torch would extract it to disk.

Pickle: every global must be data (`data_globals`) or a checked callable (`_callables`), so each call's
arguments are checked (NumPy only as plain numeric scalars and arrays, tensors within their storages,
no byte counts that allocate); BUILD only on dtypes, arrays and OrderedDicts with checked state.
A `Budget` charges what loading allocates (storages, arrays, an estimate per pickle opcode) and
stops at `max_bytes`.
"""
from __future__ import annotations

import codecs
import collections
import functools
import io
import math
import os
import pickle
import re
import stat
import struct
import tarfile
import zipfile
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

# What unpickling one opcode may allocate beyond its argument bytes (a dict, a tuple, a list slot).
OPCODE_COST = 160
ZIPINFO_COST = 12  # bytes of Python objects per byte of a zip's central directory
BUDGET_PER_FILE_BYTE = 4
BUDGET_SLACK = 64 << 20
# The dtypes a NumPy scalar or array in a checkpoint may have: bool, int, uint, float, complex.
NUMPY_KINDS = "biufc"
_MEMBER = re.compile(r"[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)*")


class Refused(Exception):
    """The file is not plain checkpoint data; the message says what, in one line."""


class ForeignGlobal(Refused, pickle.UnpicklingError):
    """A pickle names a global that is not checkpoint data: unpickling it could run code."""

    def __init__(self, name: str) -> None:
        super().__init__(f"refused global {name}")
        self.name = name


def default_budget(file_size: int) -> int:
    return BUDGET_PER_FILE_BYTE * file_size + BUDGET_SLACK


@dataclass
class Budget:
    limit: int
    used: int = 0

    def charge(self, nbytes: int, what: str) -> None:
        self.used += max(0, int(nbytes))
        if self.used > self.limit:
            raise Refused(f"loading it would take more than --max-checkpoint-bytes {self.limit} bytes "
                          f"(at {what}); refused")


# ---- the container -----------------------------------------------------------------------------

class CappedReader(io.RawIOBase):
    """A regular file's handle that never reads (or allocates) past its end, and has no fileno:
    torch's tar fallback only runs on files with one."""

    def __init__(self, raw: io.FileIO, size: int) -> None:
        super().__init__()
        self._raw, self.size = raw, size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._raw.seek(offset, whence)

    def tell(self) -> int:
        return self._raw.tell()

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        return self._raw.readinto(view[: max(0, self.size - self.tell())])

    def read(self, n: int | None = -1) -> bytes:
        left = max(0, self.size - self.tell())
        return self._raw.read(left if n is None or n < 0 else min(n, left))

    def close(self) -> None:
        self._raw.close()
        super().close()


def open_regular(path: str) -> CappedReader:
    """The file PATH names (a link the user names is followed), refused unless it is a regular file.
    O_NONBLOCK: opening a FIFO does not wait for a writer; fstat then refuses it."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise Refused("not a regular file (a FIFO, device or folder); refused")
    os.set_blocking(fd, True)
    return CappedReader(io.FileIO(fd, "rb"), info.st_size)


def is_legacy_tar(handle: CappedReader) -> bool:
    """torch < 0.4's tar archive (which torch.load would extract), as tarfile itself recognises one."""
    handle.seek(0)
    try:
        with tarfile.open(fileobj=handle, mode="r:"):
            return True
    except tarfile.TarError:
        return False
    except Exception:  # noqa: BLE001 - a header tarfile chokes on: not a plain pickle either
        return True
    finally:
        handle.seek(0)


@dataclass
class ZipLayout:
    prefix: str
    sizes: dict[str, int] = field(default_factory=dict)  # member name (under prefix) -> bytes


def _central_directory_size(handle: CappedReader) -> int:
    """From the end record torch.save writes last (no comment after it), zip64's where it has one."""
    if handle.size < 22:
        raise Refused("truncated or damaged (no zip end record)")
    handle.seek(handle.size - 22)
    end = handle.read(22)
    if end[:4] != b"PK\x05\x06":
        raise Refused("truncated or damaged (no zip end record at its end: cut short, or more after it)")
    size = struct.unpack("<I", end[12:16])[0]
    if size != 0xFFFFFFFF or handle.size < 22 + 20:
        return size
    handle.seek(handle.size - 22 - 20)  # the zip64 locator names the zip64 end record
    locator = handle.read(20)
    if locator[:4] != b"PK\x06\x07":
        raise Refused("truncated or damaged (no zip64 locator)")
    handle.seek(struct.unpack("<Q", locator[8:16])[0])
    record = handle.read(56)
    if record[:4] != b"PK\x06\x06" or len(record) < 56:
        raise Refused("truncated or damaged (no zip64 end record)")
    return struct.unpack("<Q", record[40:48])[0]


def check_zip(handle: CappedReader, budget: Budget) -> ZipLayout:
    """torch's zip as Python's zipfile reads it, held to what torch.save writes: one prefix, stored
    members, no links or directories, no two members sharing bytes, a local header that names each."""
    # zipfile makes an object of ~500 bytes per central directory entry (46+ bytes): charged first.
    budget.charge(ZIPINFO_COST * _central_directory_size(handle), "the zip's directory")
    handle.seek(0)
    try:
        archive = zipfile.ZipFile(handle)
    except (zipfile.BadZipFile, ValueError, EOFError) as exc:
        raise Refused(f"truncated or damaged ({exc})") from None
    with archive:
        infos = archive.infolist()
        if not infos or archive.comment:
            raise Refused("a zip archive torch.save did not write (empty, or with a comment)")
        if any(info.filename.endswith("/constants.pkl") for info in infos):
            raise Refused("a TorchScript archive, not a checkpoint (torch.save file)")
        prefix = infos[0].filename.split("/", 1)[0]
        layout, spans = ZipLayout(prefix), []
        for info in infos:
            name = info.filename
            inner = name[len(prefix) + 1:] if name.startswith(prefix + "/") else ""
            if not inner or not _MEMBER.fullmatch(name) or ".." in name.split("/") or inner in layout.sizes:
                raise Refused(f"zip member {name[:80]!r} is outside {prefix}/, repeated or oddly named")
            if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1 or info.is_dir():
                raise Refused(f"zip member {name[:80]!r} is compressed, encrypted or a folder "
                              "(torch.save stores files)")
            if stat.S_IFMT(info.external_attr >> 16) not in (0, stat.S_IFREG):
                raise Refused(f"zip member {name[:80]!r} is a link or special file")
            layout.sizes[inner] = info.file_size
            spans.append((info.header_offset, info))
        if sum(layout.sizes.values()) > handle.size:
            raise Refused("its zip members declare more bytes than the file holds")
        budget.charge(layout.sizes.get("data.pkl", 0), "data.pkl")
        _check_spans(handle, sorted(spans, key=lambda span: span[0]), handle.size)
    if "data.pkl" not in layout.sizes:
        raise Refused("a zip archive without data.pkl (not a torch.save file)")
    return layout


def _check_spans(handle: CappedReader, spans: list[tuple[int, zipfile.ZipInfo]], size: int) -> None:
    """Each member's local header names it, and no two members share bytes (an overlap bomb)."""
    end = 0
    for start, info in spans:
        handle.seek(start)
        header = handle.read(30)
        if start < end or len(header) < 30 or header[:4] != b"PK\x03\x04":
            raise Refused(f"zip member {info.filename[:80]!r} overlaps another or has no local header")
        name_length, extra_length = struct.unpack("<HH", header[26:30])
        if handle.read(name_length) != info.orig_filename.encode("utf-8", "surrogateescape"):
            raise Refused(f"zip member {info.filename[:80]!r}: its local header names another file")
        end = start + 30 + name_length + extra_length + info.compress_size
        if end > size:
            raise Refused(f"zip member {info.filename[:80]!r} runs past the end of the file")


# ---- the pickle --------------------------------------------------------------------------------

class Checked:
    """A global the pickle may call: `check` sees the arguments first."""

    def __init__(self, name: str, target: Callable[..., Any], check: Callable[..., None]) -> None:
        self.name, self.target, self.check = name, target, check

    def __call__(self, *args: Any) -> Any:
        self.check(*args)
        return self.target(*args)


def _ints(values: Any, what: str) -> tuple[int, ...]:
    if not isinstance(values, (tuple, list)) or not all(type(v) is int and v >= 0 for v in values):
        raise Refused(f"{what}: not a tuple of non-negative ints")
    return tuple(values)


def _no_args(*args: Any) -> None:
    if args:
        raise Refused("OrderedDict called with arguments")


def _check_collection(*args: Any) -> None:
    if len(args) > 1 or (args and not isinstance(args[0], (list, tuple, set, frozenset))):
        raise Refused("set/frozenset of something other than a list")


def _check_complex(*args: Any) -> None:
    if len(args) > 2 or not all(type(a) in (int, float) for a in args):
        raise Refused("complex of something other than numbers")


def _check_bytearray(*args: Any) -> None:
    # bytearray(N) would allocate N bytes: only bytes (protocol 3+) or latin-1 text (protocol 2).
    if not (len(args) == 1 and type(args[0]) is bytes) and \
            not (len(args) == 2 and type(args[0]) is str and args[1] in ("latin-1", "latin1")):
        raise Refused("bytearray of something other than its bytes")


def _check_empty_bytes(*args: Any) -> None:  # protocol 2 writes b"" as bytes(); bytes(N) would allocate
    if args:
        raise Refused("bytes called with arguments")


def _check_encode(*args: Any) -> None:
    if not (len(args) == 2 and type(args[0]) is str and args[1] in ("latin1", "latin-1")):
        raise Refused("_codecs.encode other than of latin-1 text")


def _check_size(*args: Any) -> None:
    if len(args) != 1:
        raise Refused("torch.Size with other than one tuple")
    _ints(args[0], "torch.Size")


def _check_device(*args: Any) -> None:
    if not (1 <= len(args) <= 2 and type(args[0]) is str and (len(args) == 1 or type(args[1]) is int)):
        raise Refused("torch.device of something other than a name")


def _plain_dtype(dtype: Any) -> np.dtype:
    if not isinstance(dtype, np.dtype) or dtype.kind not in NUMPY_KINDS or dtype.hasobject \
            or dtype.fields is not None or dtype.subdtype is not None or dtype.flags != 0:
        raise Refused(f"a NumPy dtype other than a plain number ({dtype!r:.60})")
    return dtype


def _check_np_dtype(*args: Any) -> None:
    if not (1 <= len(args) <= 3 and type(args[0]) is str and all(type(a) is bool for a in args[1:])):
        raise Refused("numpy.dtype of something other than a type code")
    try:
        _plain_dtype(np.dtype(args[0]))
    except TypeError:
        raise Refused(f"numpy.dtype {args[0][:20]!r}") from None


def _check_scalar(*args: Any) -> None:
    if len(args) != 2 or type(args[1]) is not bytes:
        raise Refused("numpy scalar other than a dtype and its bytes")
    if len(args[1]) != _plain_dtype(args[0]).itemsize:
        raise Refused("numpy scalar whose bytes do not fit its dtype")


def _check_reconstruct(*args: Any) -> None:
    if args != (np.ndarray, (0,), b"b"):
        raise Refused("numpy _reconstruct other than an empty ndarray")


def _array_bytes(dtype: Any, shape: Any) -> int:
    return math.prod(_ints(shape, "numpy shape")) * _plain_dtype(dtype).itemsize


class _Guard:
    """The checks that need the load's state: storages torch made, and the budget."""

    def __init__(self, budget: Budget, layout: ZipLayout | None, file_size: int) -> None:
        self.budget, self.layout, self.file_size = budget, layout, file_size
        self.storages: dict[int, int] = {}  # id of a storage torch made -> its element count
        self.declared: dict[Any, int] = {}  # storage key -> bytes declared

    def frombuffer(self, buffer: Any, dtype: Any, shape: Any, order: Any) -> None:
        if type(buffer) not in (bytes, bytearray) or order not in ("C", "F"):
            raise Refused("numpy _frombuffer other than of bytes")
        if len(buffer) != _array_bytes(dtype, shape):
            raise Refused("numpy _frombuffer whose bytes do not fit its shape")

    def storage(self, saved_id: Any) -> tuple[Any, int]:
        """A persistent id as torch.save writes it: ('storage', type, key, location, numel[, view])."""
        if not (isinstance(saved_id, tuple) and len(saved_id) in (5, 6) and saved_id[0] == "storage"):
            raise Refused("a persistent id other than a storage")
        storage_type, key, location, numel = saved_id[1:5]
        dtype = torch.uint8 if storage_type is torch.UntypedStorage else getattr(storage_type, "dtype", None)
        if not isinstance(dtype, torch.dtype) or type(key) is not str or type(location) is not str \
                or type(numel) is not int or numel < 0:
            raise Refused("a storage id other than (type, key, location, count)")
        nbytes = numel * torch._utils._element_size(dtype)
        if key in self.declared:
            return dtype, nbytes
        if self.layout is not None and self.layout.sizes.get(f"data/{key}") != nbytes:
            raise Refused(f"storage {key[:40]!r} declares {nbytes} bytes; its zip member holds "
                          f"{self.layout.sizes.get(f'data/{key}')}")
        if self.layout is None and sum(self.declared.values()) + nbytes > self.file_size:
            raise Refused("its storages declare more bytes than the file holds")
        if len(saved_id) == 6 and saved_id[5] is not None:
            view = saved_id[5]
            if not (isinstance(view, tuple) and len(view) == 3 and type(view[0]) is str):
                raise Refused("a storage view other than (key, offset, size)")
            offset, size = _ints(view[1:], "storage view")
            if offset + size > numel:
                raise Refused("a storage view past its storage")
        self.declared[key] = nbytes
        self.budget.charge(nbytes, f"storage {key[:40]}")
        return dtype, nbytes

    def tensor(self, storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any = False,
               hooks: Any = None, *rest: Any) -> None:
        if not isinstance(storage, torch.storage.TypedStorage) or id(storage) not in self.storages:
            raise Refused("a tensor not built on one of the file's storages")
        size, stride = _ints(size, "tensor size"), _ints(stride, "tensor stride")
        if type(offset) is not int or offset < 0 or len(size) != len(stride) or type(requires_grad) is not bool:
            raise Refused("a tensor with odd offset, size or stride")
        if hooks:
            raise Refused("a tensor with backward hooks")
        for extra in rest:  # _v3's dtype, then metadata
            if not (extra is None or isinstance(extra, torch.dtype)
                    or (isinstance(extra, dict) and all(type(k) is str and type(v) is bool for k, v in extra.items()))):
                raise Refused("a tensor with odd metadata")
        if all(size) and offset + sum((n - 1) * s for n, s in zip(size, stride)) >= self.storages[id(storage)]:
            raise Refused("a tensor reaching past its storage")

    def parameter(self, data: Any, requires_grad: Any = False, hooks: Any = None, *state: Any) -> None:
        if not isinstance(data, torch.Tensor) or type(requires_grad) is not bool or hooks or any(state):
            raise Refused("a Parameter other than a tensor and its requires_grad")

    def from_type(self, func: Any, new_type: Any, args: Any, state: Any) -> None:
        if not (isinstance(func, Checked) and func.target in _REBUILDS and new_type in (torch.Tensor, torch.nn.Parameter)
                and isinstance(args, tuple) and not state):
            raise Refused("a tensor rebuilt other than as a plain Tensor or Parameter")


_REBUILDS = {getattr(torch._utils, name) for name in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3",
                                                      "_rebuild_parameter", "_rebuild_parameter_with_state")}


def _numpy_modules() -> tuple[Any, Any]:
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # NumPy 1.x
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    return multiarray, numeric


@functools.cache
def data_globals() -> dict[tuple[str, str], Any]:
    """Globals that are data, never called: dtypes, and the classes that name what to rebuild."""
    found: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("torch", "Tensor"): torch.Tensor,
                                         ("torch.nn.parameter", "Parameter"): torch.nn.Parameter,
                                         ("torch", "UntypedStorage"): torch.UntypedStorage}
    for name in dir(torch):
        if isinstance(getattr(torch, name), torch.dtype):
            found[("torch", name)] = getattr(torch, name)
    return found


def _callables(guard: _Guard) -> dict[tuple[str, str], Checked]:
    """The globals a checkpoint may call, each with its argument check."""
    multiarray, numeric = _numpy_modules()
    plain = {("collections", "OrderedDict"): (collections.OrderedDict, _no_args),
             ("builtins", "set"): (set, _check_collection), ("builtins", "frozenset"): (frozenset, _check_collection),
             ("builtins", "complex"): (complex, _check_complex), ("builtins", "bytearray"): (bytearray, _check_bytearray),
             ("_codecs", "encode"): (codecs.encode, _check_encode),
             ("__builtin__", "bytes"): (bytes, _check_empty_bytes), ("builtins", "bytes"): (bytes, _check_empty_bytes),
             ("torch", "Size"): (torch.Size, _check_size), ("torch", "device"): (torch.device, _check_device),
             ("numpy", "dtype"): (np.dtype, _check_np_dtype),
             ("torch._tensor", "_rebuild_from_type_v2"): (torch._tensor._rebuild_from_type_v2, guard.from_type)}
    for name in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3"):
        plain[("torch._utils", name)] = (getattr(torch._utils, name), guard.tensor)
    for name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
        plain[("torch._utils", name)] = (getattr(torch._utils, name), guard.parameter)
    for package in ("numpy.core", "numpy._core"):  # NumPy 2's module names and NumPy 1's
        plain[(f"{package}.multiarray", "scalar")] = (multiarray.scalar, _check_scalar)
        plain[(f"{package}.multiarray", "_reconstruct")] = (multiarray._reconstruct, _check_reconstruct)
        plain[(f"{package}.numeric", "_frombuffer")] = (numeric._frombuffer, guard.frombuffer)
    return {key: Checked(f"{key[0]}.{key[1]}", target, check) for key, (target, check) in plain.items()}


def _check_dtype_state(state: Any) -> None:
    # (version 3, byte order, no subarray, no names, no fields, elsize -1, alignment -1, flags 0)
    if not (isinstance(state, tuple) and len(state) == 8 and state[0] == 3 and state[1] in ("<", ">", "|", "=")
            and state[2:5] == (None, None, None) and state[5:] == (-1, -1, 0)):
        raise Refused("a NumPy dtype with state other than a byte order (flags, fields or sizes)")


def _check_array_state(state: Any) -> None:
    if not (isinstance(state, tuple) and len(state) == 5 and state[0] == 1 and type(state[3]) is bool
            and type(state[4]) is bytes):
        raise Refused("a NumPy array with state other than (shape, dtype, order, bytes)")
    if len(state[4]) != _array_bytes(state[2], state[1]):
        raise Refused("a NumPy array whose bytes do not fit its shape")


def _counted(load: Callable[[Any], None]) -> Callable[[Any], None]:
    def counted(self: GuardedUnpickler) -> None:
        self.guard.budget.charge(OPCODE_COST, "the pickle's objects")
        load(self)
    return counted


class GuardedUnpickler(pickle._Unpickler):  # type: ignore[name-defined]
    """The pure-Python unpickler (its opcodes can be overridden, the C one's cannot) restricted to
    checkpoint data. torch.load subclasses it, resolves storage type names itself and sets
    `persistent_load`, which is checked here before torch's runs."""

    guard: _Guard  # set by `guarded` before torch.load makes its instances

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._callables = _callables(self.guard)

    def find_class(self, module: str, name: str) -> Any:
        key = (module, name)
        if type(module) is str and type(name) is str:
            if key in self._callables:
                return self._callables[key]
            if key in data_globals():
                return data_globals()[key]
        raise ForeignGlobal(f"{module}.{name}")

    # torch assigns its loader to `persistent_load`; ours checks the id first.
    @property
    def persistent_load(self) -> Callable[[Any], Any]:
        return self._checked_persistent_load

    @persistent_load.setter
    def persistent_load(self, load: Callable[[Any], Any]) -> None:
        self._torch_persistent_load = load

    def _torch_persistent_load(self, saved_id: Any) -> Any:
        raise Refused("a persistent id outside torch's data pickle")

    def _checked_persistent_load(self, saved_id: Any) -> Any:
        self.guard.storage(saved_id)
        loaded = self._torch_persistent_load(saved_id)
        if isinstance(loaded, torch.storage.TypedStorage):
            self.guard.storages[id(loaded)] = loaded._untyped_storage.nbytes() // torch._utils._element_size(loaded.dtype)
        return loaded

    def _call(self, func: Any, args: Any) -> Any:
        if not isinstance(func, Checked):
            raise Refused(f"the pickle calls {getattr(func, '__name__', type(func).__name__)}, which is data")
        if not isinstance(args, tuple):
            raise Refused("a call whose arguments are not a tuple")
        try:
            return func(*args)
        except Refused:
            raise
        except Exception as exc:  # noqa: BLE001 - the check passed but the call did not: damaged
            raise Refused(f"{func.name} failed ({type(exc).__name__})") from None

    def load_reduce(self) -> None:
        args = self.stack.pop()
        self.stack[-1] = self._call(self.stack[-1], args)

    def load_newobj(self) -> None:  # protocol 2+ builds a complex number so
        args = self.stack.pop()
        cls = self.stack.pop()
        if not (isinstance(cls, Checked) and cls.target is complex):
            raise Refused("the pickle builds an object with NEWOBJ")
        self.append(self._call(cls, args))

    def load_newobj_ex(self) -> None:
        raise Refused("the pickle builds an object with NEWOBJ_EX")

    def load_inst(self) -> None:
        raise Refused("the pickle builds an object with INST/OBJ")

    def load_build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        if type(inst) is np.dtype or isinstance(inst, np.dtype):
            _check_dtype_state(state)
            inst.__setstate__(state)
        elif type(inst) is np.ndarray:
            _check_array_state(state)
            self.guard.budget.charge(len(state[4]), "a NumPy array")
            inst.__setstate__(state)
        elif type(inst) is collections.OrderedDict and type(state) is dict and set(state) <= {"_metadata"} \
                and all(type(v) in (dict, collections.OrderedDict) for v in state.values()):
            # a state dict's `_metadata`, and nothing else: an attribute named `get` or `items` would
            # shadow the dict's own method for every reader
            inst.__dict__.update(state)
        else:
            raise Refused(f"the pickle sets the state of a {type(inst).__name__}")

    dispatch = {code: _counted(load) for code, load in pickle._Unpickler.dispatch.items()}
    dispatch[pickle.REDUCE[0]] = _counted(load_reduce)
    dispatch[pickle.BUILD[0]] = _counted(load_build)
    dispatch[pickle.NEWOBJ[0]] = _counted(load_newobj)
    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex
    dispatch[pickle.INST[0]] = dispatch[pickle.OBJ[0]] = load_inst


def guarded(budget: Budget, layout: ZipLayout | None, file_size: int) -> Any:
    """The `pickle_module` torch.load unpickles with, for one load."""
    guard = _Guard(budget, layout, file_size)
    unpickler = type("Unpickler", (GuardedUnpickler,), {"guard": guard})

    class Module:
        __name__ = "clap_model.pickle_guard"
        Unpickler = unpickler
        UnpicklingError = pickle.UnpicklingError

        @staticmethod
        def load(file: Any, **kwargs: Any) -> Any:
            return unpickler(file, **kwargs).load()

    return Module
