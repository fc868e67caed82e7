"""Streaming safetensors I/O: read one tensor at a time with plain reads, write a file tensor by
tensor after its header, and hash both files in the same pass.

The safetensors library loads or mmaps whole files and writes whole dicts; a constant-memory
merge needs neither (mmap'd pages count as resident memory once touched). The format is small:
8-byte little-endian header length, a JSON header (name → dtype, shape, data_offsets), then the
tensor bytes in offset order with no gaps.
"""
from __future__ import annotations

import hashlib
import json
import os
import queue
import struct
import threading
from pathlib import Path
from typing import Any

from emq.errors import EmqError

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def torch_dtype(code: str):
    import torch

    return {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
            "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
            "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}[code]


def dtype_code(dtype) -> str:
    import torch

    return {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
            torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
            torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}[dtype]


class Reader:
    """Random-access reader of one safetensors file with plain reads (no mmap)."""

    def __init__(self, path: Path):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        if hasattr(os, "posix_fadvise"):  # read ahead while we compute: the file is read once, in order
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_WILLNEED)
        from emq.detect import safetensors_header  # the one validating header parser

        header = safetensors_header(path)
        (n,) = struct.unpack("<Q", os.pread(self.fd, 8, 0))
        self.data_start = 8 + n
        self.header: dict[str, dict[str, Any]] = header
        self.names = sorted(header, key=lambda k: header[k]["data_offsets"][0])  # file order

    def span(self, name: str) -> tuple[int, int]:
        """(absolute offset, length) of the tensor's bytes in the file."""
        start, end = self.header[name]["data_offsets"]
        return self.data_start + start, end - start

    def tensor(self, name: str):
        import torch

        offset, length = self.span(name)
        buf = bytearray(length)
        view, done = memoryview(buf), 0
        while done < length:
            n = os.preadv(self.fd, [view[done:]], offset + done)
            if n == 0:
                raise EmqError(f"{self.path} is truncated at tensor {name}", "re-download or re-save the weights")
            done += n
        info = self.header[name]
        if not length:
            return torch.empty(info["shape"], dtype=torch_dtype(info["dtype"]))
        return torch.frombuffer(buf, dtype=torch_dtype(info["dtype"])).reshape(info["shape"])

    def close(self) -> None:
        os.close(self.fd)


class Writer:
    """Writes a safetensors file whose tensor list is known up front, one tensor at a time.

    A background thread does the writing and the sha256, so they overlap the caller's compute.
    Untouched tensors can be copied file-to-file in the kernel (`copy`), which on this project's
    build machines is ~9x faster than writing the same bytes from user space.
    """

    def __init__(self, path: Path, entries: list[tuple[str, str, list[int]]], metadata: dict[str, str] | None = None):
        header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
        offset = 0
        self._expect: list[tuple[str, int]] = []
        for name, code, shape in entries:
            n = DTYPE_BYTES[code]
            for d in shape:
                n *= d
            header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + n]}
            self._expect.append((name, n))
            offset += n
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the library pads the header to 8 bytes
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._hash = hashlib.sha256()
        self._pos = 0
        self._flushed = 0
        self._i = 0
        self._error: BaseException | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=4)
        self._thread = threading.Thread(target=self._run, name=f"emq-write-{path.name}", daemon=True)
        self._thread.start()
        self._queue.put(("bytes", struct.pack("<Q", len(blob)) + blob))

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is not None:
                continue
            try:
                kind, payload = item
                if kind == "bytes":
                    view = memoryview(payload).cast("B")
                    self._hash.update(view)
                    done = 0
                    while done < len(view):
                        done += os.pwrite(self._fd, view[done:], self._pos + done)
                    self._pos += len(view)
                    self._start_writeback()
                else:  # ("copy", (src_fd, src_offset, length))
                    src, src_off, length = payload
                    done = 0
                    while done < length:
                        n = os.copy_file_range(src, self._fd, length - done, src_off + done, self._pos + done)
                        if n == 0:
                            raise OSError(f"short copy into {self.path}")
                        done += n
                    for off in range(0, length, 1 << 24):  # hash what was copied (page cache reads)
                        self._hash.update(os.pread(src, min(1 << 24, length - off), src_off + off))
                    self._pos += length
                    self._start_writeback()
            except BaseException as e:  # surfaced by close()
                self._error = e

    def _start_writeback(self, every: int = 256 << 20) -> None:
        """Ask the kernel to start writing finished bytes to disk now (FADV_DONTNEED starts
        writeback of dirty pages and drops clean ones), so the fsync at close has little left to
        wait for and a large merge does not fill the page cache."""
        if self._pos - self._flushed >= every and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._fd, self._flushed, self._pos - self._flushed, os.POSIX_FADV_DONTNEED)
            self._flushed = self._pos

    def _next(self, name: str, size: int) -> None:
        if self._error is not None:
            raise self._error
        want, expected = self._expect[self._i]
        if name != want or size != expected:
            raise RuntimeError(f"safetensors writer: expected {want} ({expected} bytes), got {name} ({size} bytes)")
        self._i += 1

    def write(self, name: str, data) -> None:
        """Append the next tensor (a tensor, or its raw bytes)."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            import torch

            data = data.contiguous().view(-1).view(torch.uint8).numpy()
        self._next(name, memoryview(data).nbytes)
        self._queue.put(("bytes", data))

    def copy(self, name: str, src_fd: int, src_offset: int, length: int) -> None:
        """Append the next tensor by copying its bytes from another file, in the kernel."""
        self._next(name, length)
        self._queue.put(("copy", (src_fd, src_offset, length)))

    def abort(self) -> None:
        """Stop after a failure elsewhere: drop what is queued, close the file, raise nothing."""
        self._error = self._error or RuntimeError("aborted")
        self._queue.put(None)
        self._thread.join()
        os.close(self._fd)

    def close(self) -> str:
        """Finish writing and fsync (here, while other shards are still being merged); the sha256."""
        self._queue.put(None)
        self._thread.join()
        if self._error is None:
            os.fsync(self._fd)
        os.close(self._fd)
        if self._error is not None:
            raise self._error
        if self._i != len(self._expect):
            raise RuntimeError(f"safetensors writer: {len(self._expect) - self._i} tensors not written to {self.path}")
        return self._hash.hexdigest()
