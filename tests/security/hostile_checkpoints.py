"""Hostile checkpoint files, written into a folder, for tests/security/test_checkpoints.py.

Each maker writes one file (or folder) and returns its path. `MARKER` and `VICTIM` name what an
exploit would create or change in the folder's parent (outside the folder the commands write to).
Pickles are written opcode by opcode where torch.save would never write them; `torch_zip` and
`legacy_file` wrap a pickle in torch's two containers exactly as torch lays them out, and the
controls (`benign_*`) prove a wrapped benign pickle loads, so a refusal is the guard's doing.
"""
from __future__ import annotations

import io
import os
import pickle
import stat
import struct
import sys
import tarfile
import zipfile
from pathlib import Path
from typing import Callable

import torch

MARKER = "ran-marker"  # in the victim folder: appears if a payload ran
VICTIM = "victim.txt"  # in the victim folder: its mode, bytes and mtime must not change

# ---- pickle opcodes ----------------------------------------------------------------------------


def proto(n: int = 2) -> bytes:
    return bytes([0x80, n])


def glob(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def lit(value: object) -> bytes:
    """The opcodes pushing one plain value (str, bytes, int, bool, None, float); bytes as BINBYTES."""
    return pickle.dumps(value, protocol=3 if isinstance(value, bytes) else 2)[2:-1]


def tup(*parts: bytes) -> bytes:
    return b"(" + b"".join(parts) + b"t"


def call(func: bytes, *args: bytes) -> bytes:
    return func + tup(*args) + b"R"


def storage_id(key: str, numel: int, legacy: bool = False, kind: str = "FloatStorage") -> bytes:
    """A persistent id as torch.save writes it: ('storage', type, key, location, numel[, view])."""
    parts = [lit("storage"), glob("torch", kind), lit(key), lit("cpu"), lit(numel)] + ([lit(None)] if legacy else [])
    return tup(*parts) + b"Q"


def tensor(storage: bytes, size: tuple[int, ...], stride: tuple[int, ...]) -> bytes:
    return call(glob("torch._utils", "_rebuild_tensor_v2"), storage, lit(0), lit(size), lit(stride), lit(False),
                call(glob("collections", "OrderedDict")))


def dict_of(**items: bytes) -> bytes:
    return b"}(" + b"".join(lit(k) + v for k, v in items.items()) + b"u"


def done(body: bytes, protocol: int = 2) -> bytes:
    return proto(protocol) + body + b"."


# ---- containers --------------------------------------------------------------------------------

def torch_zip(path: Path, data_pkl: bytes, storages: dict[str, bytes] | None = None,
              compress: dict[str, int] | None = None) -> Path:
    """torch's zip layout (the members torch.save writes for `{}`), data.pkl and data/KEY replaced."""
    buffer = io.BytesIO()
    torch.save({}, buffer)
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as template:
        prefix = template.namelist()[0].split("/")[0]
        members = {name: template.read(name) for name in template.namelist() if not name.endswith("data.pkl")}
    members[f"{prefix}/data.pkl"] = data_pkl
    members.update({f"{prefix}/data/{key}": value for key, value in (storages or {}).items()})
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name, value in members.items():
            archive.writestr(name, value, compress_type=(compress or {}).get(name.rsplit("/", 1)[-1], zipfile.ZIP_STORED))
    return path


def legacy_file(path: Path, body: bytes, keys: list[str] | None = None, tail: bytes = b"") -> Path:
    """torch < 1.6's bare format: magic, protocol and sys_info pickles, the object, its storage keys."""
    head = b"".join(pickle.dumps(x, protocol=2) for x in (0x1950A86A20F9469CFC6C, 1001,
                                                          {"protocol_version": 1001, "little_endian": True}))
    path.write_bytes(head + body + pickle.dumps(keys or [], protocol=2) + tail)
    return path


# ---- makers: code, NumPy, legacy tar ----------------------------------------------------------

class Payload:
    def __init__(self, func: Callable, *args: object) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def code_global(folder: Path, protocol: int, zipped: bool) -> Path:
    """os.system('touch MARKER') in a checkpoint torch.save wrote, any protocol, either container."""
    marker = folder.parent / MARKER
    state = {"state_dict": torch.nn.Linear(2, 2).state_dict(), "epoch": Payload(os.system, f"touch {marker}")}
    path = folder / f"code-p{protocol}-{'zip' if zipped else 'legacy'}.pt"
    torch.save(state, path, pickle_protocol=protocol, _use_new_zipfile_serialization=zipped)
    return path


def code_global_protocol0(folder: Path) -> Path:
    """The same payload in a protocol 0 data.pkl (text opcodes; no tensors: torch cannot load
    protocol 0 persistent ids)."""
    payload = Payload(os.system, f"touch {folder.parent / MARKER}")
    return torch_zip(folder / "code-p0.pt", pickle.dumps({"epoch": payload}, protocol=0))


def exec_in_zip(folder: Path) -> Path:
    """builtins.exec through protocol 0's INST opcode, which names and calls in one step."""
    code = f"open({str(folder.parent / MARKER)!r}, 'w').close()"
    return torch_zip(folder / "inst.pt", b"(ibuiltins\nexec\n" + b"V" + code.encode() + b"\n" + b"tp0\n.")


def numpy_object_scalar(folder: Path) -> Path:
    """dtype('O8') then scalar(dtype, 8 bytes): the 8 bytes become a PyObject pointer."""
    dtype = call(glob("numpy", "dtype"), lit("O8"), lit(False), lit(True))
    state = tup(lit(3), lit("|"), lit(None), lit(None), lit(None), lit(-1), lit(-1), lit(63)) + b"b"
    body = call(glob("numpy._core.multiarray", "scalar"), dtype + state, lit(struct.pack("<Q", 0x41414141)))
    return torch_zip(folder / "np-object.pt", done(dict_of(lr=body)))


def numpy_flags_on_float(folder: Path) -> Path:
    """A float dtype whose BUILD sets object flags: the same pointer trick without an 'O' type code."""
    dtype = call(glob("numpy", "dtype"), lit("f8"), lit(False), lit(True))
    state = tup(lit(3), lit("<"), lit(None), lit(None), lit(None), lit(-1), lit(-1), lit(63)) + b"b"
    body = call(glob("numpy.core.multiarray", "scalar"), dtype + state, lit(b"\0" * 8))
    return legacy_file(folder / "np-flags.pt", done(dict_of(lr=body)))


def legacy_tar(folder: Path, member: str) -> Path:
    """torch < 0.4's tar format, named so the file starts with 0x80 0x02: a 'storages' member that
    torch would extract is a hard link to VICTIM (mode 04777), a char device or a FIFO."""
    path = folder / f"tar-{member}.pt"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT, encoding="latin-1") as tar:
        first = tarfile.TarInfo("\x80\x02" + "p" * 20)
        first.size = 0
        tar.addfile(first, io.BytesIO())
        info = tarfile.TarInfo("storages")
        if member == "hardlink":
            info.type, info.linkname, info.mode = tarfile.LNKTYPE, str(folder.parent / VICTIM), 0o4777
        elif member == "chardev":
            info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
        else:
            info.type = tarfile.FIFOTYPE
        tar.addfile(info)
    assert path.read_bytes()[:2] == b"\x80\x02"
    return path


# ---- makers: memory ---------------------------------------------------------------------------

def bytearray_bomb(folder: Path) -> Path:
    """bytearray(3.3e9): a few hundred bytes that allocate 3.3 GB."""
    return torch_zip(folder / "bytearray.pt", done(dict_of(x=call(glob("builtins", "bytearray"), lit(3_300_000_000)))))


def storage_newobj_bomb(folder: Path) -> Path:
    """UntypedStorage.__new__(UntypedStorage, 3e9) through NEWOBJ."""
    body = glob("torch", "UntypedStorage") + tup(lit(3_000_000_000)) + b"\x81"
    return torch_zip(folder / "newobj.pt", done(dict_of(x=body)))


def legacy_storage_bomb(folder: Path) -> Path:
    """A legacy file declaring a 4 GB storage: torch allocates it before reading any data."""
    return legacy_file(folder / "legacy-storage.pt", done(dict_of(w=storage_id("0", 10**9, legacy=True))), ["0"])


def zip_storage_bomb(folder: Path) -> Path:
    """A zip whose data.pkl declares 10^9 floats for a 4-byte member."""
    return torch_zip(folder / "zip-storage.pt", done(dict_of(w=tensor(storage_id("0", 10**9), (1,), (1,)))),
                     {"0": b"\0" * 4})


def deflate_bomb(folder: Path, nbytes: int = 1 << 28) -> Path:
    """A deflated member of NBYTES zeros (about a thousandth of that on disk)."""
    path = torch_zip(folder / "deflate.pt", done(dict_of(w=tensor(storage_id("0", nbytes // 4), (1,), (1,)))),
                     {"0": b""})
    return _deflate_member(path, "data/0", nbytes)


def _deflate_member(path: Path, member: str, nbytes: int) -> Path:
    with zipfile.ZipFile(path) as archive:
        names = [(info.filename, archive.read(info) if not info.filename.endswith(member) else None)
                 for info in archive.infolist()]
    with zipfile.ZipFile(path, "w") as archive:
        for name, value in names:
            if value is not None:
                archive.writestr(name, value)
                continue
            info = zipfile.ZipInfo(name)
            info.compress_type = zipfile.ZIP_DEFLATED
            with archive.open(info, "w", force_zip64=True) as out:  # chunk by chunk: no 1 GB in memory
                chunk = b"\0" * (1 << 24)
                for _ in range(nbytes // len(chunk)):
                    out.write(chunk)
    return path


def declared_size_bomb(folder: Path) -> Path:
    """A stored member whose central directory entry declares 4 GB (the file holds 4 bytes)."""
    path = torch_zip(folder / "declared.pt", done(dict_of(w=tensor(storage_id("0", 1), (1,), (1,)))), {"0": b"\0" * 4})
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        name = next(n for n in archive.namelist() if n.endswith("/data/0")).encode()
    at = data.rfind(b"PK\x01\x02", 0, data.rfind(name))  # the central header naming data/0
    data[at + 20:at + 28] = struct.pack("<II", 0xFFFFFFF0, 0xFFFFFFF0)  # compressed, uncompressed size
    path.write_bytes(bytes(data))
    return path


def opcode_bomb(folder: Path, count: int = 20_000_000) -> Path:
    """20 MB of EMPTY_DICT opcodes: each one a 64-byte dict, 1.3 GB in all."""
    return torch_zip(folder / "opcodes.pt", proto(2) + b"}" * count + b".")


def numpy_array_bomb(folder: Path) -> Path:
    """_reconstruct then a BUILD declaring 10^9 floats with no bytes."""
    array = call(glob("numpy._core.multiarray", "_reconstruct"), glob("numpy", "ndarray"), lit((0,)), lit(b"b"))
    dtype = call(glob("numpy", "dtype"), lit("f8"), lit(False), lit(True))
    state = tup(lit(1), lit((10**9,)), dtype, lit(False), lit(b"")) + b"b"
    return torch_zip(folder / "np-array.pt", done(dict_of(x=array + state)))


def tensor_past_storage(folder: Path) -> Path:
    """A 10^5 x 10^5 view of a one-float storage."""
    body = tensor(storage_id("0", 1), (10**5, 10**5), (10**5, 1))
    return torch_zip(folder / "view.pt", done(dict_of(w=body)), {"0": b"\0" * 4})


def build_on_tensor(folder: Path) -> Path:
    """BUILD on a tensor: setstate of something that is not a container."""
    body = tensor(storage_id("0", 1), (1,), (1,)) + dict_of(requires_grad=lit(True)) + b"b"
    return torch_zip(folder / "build.pt", done(dict_of(w=body)), {"0": b"\0" * 4})


def legacy_module_id(folder: Path) -> Path:
    """A legacy persistent id of type 'module', which torch answers with the object it names."""
    body = tup(lit("module"), glob("collections", "OrderedDict"), lit(""), lit("")) + b"Q"
    return legacy_file(folder / "module-id.pt", done(dict_of(m=body)))


# ---- makers: the zip itself -------------------------------------------------------------------

def zip_symlink_member(folder: Path) -> Path:
    path = benign_zip(folder, "symlink.pt")
    with zipfile.ZipFile(path, "a") as archive:
        prefix = archive.namelist()[0].split("/")[0]
        info = zipfile.ZipInfo(f"{prefix}/data/9")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        archive.writestr(info, "/etc/passwd")
    return path


def zip_outside_prefix(folder: Path) -> Path:
    path = benign_zip(folder, "outside.pt")
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr("../escape", b"x")
    return path


def zip_trailing_data(folder: Path) -> Path:
    """Bytes after the end record: a second reader could see another directory there."""
    path = benign_zip(folder, "trailing.pt")
    with path.open("ab") as handle:
        handle.write(b"PK\x05\x06" + b"\0" * 18 + b"junk")
    return path


# ---- makers: structure ------------------------------------------------------------------------

def saved(folder: Path, name: str, obj: object) -> Path:
    torch.save(obj, folder / name)
    return folder / name


def tiny_config() -> dict:
    from clap_model.config import get_preset

    return get_preset("tiny").to_dict()


def structural(folder: Path) -> dict[str, Path]:
    """Files that load but are no checkpoint a command can use."""
    weights = {"logit_scale_a": torch.zeros(())}
    no_audio = {k: v for k, v in tiny_config().items() if k != "audio"}
    bad_type = tiny_config()
    bad_type["audio"]["embed_dim"] = "96"
    huge = tiny_config()
    huge["audio"]["embed_dim"] = 10**9
    wide = tiny_config()  # within the size limits, but a 6 GB text tower for a file of a few bytes
    wide["text"].update(hidden_size=8192, intermediate_size=32768)
    return {
        "huge-config": saved(folder, "huge-config.pt", {"config": huge, "state_dict": weights}),
        "wide-config": saved(folder, "wide-config.pt", {"config": wide, "state_dict": weights}),
        "none": saved(folder, "none.pt", None),
        "list": saved(folder, "list.pt", [1, 2, 3]),
        "list-config": saved(folder, "list-config.pt", {"config": [1, 2], "state_dict": weights}),
        "int-keys": saved(folder, "int-keys.pt", {"config": tiny_config(), "state_dict": {1: torch.zeros(1)}}),
        "missing-audio": saved(folder, "missing-audio.pt", {"config": no_audio, "state_dict": weights}),
        "config-type": saved(folder, "config-type.pt", {"config": bad_type, "state_dict": weights}),
    }


# ---- controls ---------------------------------------------------------------------------------

def benign_zip(folder: Path, name: str = "benign.pt") -> Path:
    """What torch_zip writes for a plain dict with one tensor: loads."""
    return torch_zip(folder / name, done(dict_of(w=tensor(storage_id("0", 2), (2,), (1,)), epoch=lit(3))),
                     {"0": struct.pack("<ff", 1.5, -2.0)})


def benign_legacy(folder: Path) -> Path:
    """What legacy_file writes for a plain dict: loads."""
    return legacy_file(folder / "benign-legacy.pt", done(dict_of(epoch=lit(3), name=lit("run"))))


if __name__ == "__main__":  # write every file into the folder given, to try by hand
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    print(code_global(out, 4, True), numpy_object_scalar(out), legacy_tar(out, "hardlink"), bytearray_bomb(out))
