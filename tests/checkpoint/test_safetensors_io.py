"""stio: bf16 bits in numpy, the streaming reader and the direct-I/O writer, on real files."""
from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from emq.checkpoint import safetensors_io as stio
from tests.conftest import REPO


def _bits(t: torch.Tensor) -> np.ndarray:
    return t.view(torch.int16).numpy().view(np.uint16)


def test_bf16_rounding_is_torchs_round_to_nearest_even():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([
        torch.randn(100_000, generator=g) * 10.0 ** torch.randint(-40, 38, (100_000,), generator=g).float(),
        # exact ties (low 16 bits 0x8000) with odd and even upper halves, subnormals, extremes
        torch.tensor([0x3F808000, 0x3F818000, 0xBF808000, 0x00018000, 0x00008000, 0x7F7F8000, 0x7F7F7FFF],
                     dtype=torch.int64).to(torch.int32).view(torch.float32),
        torch.tensor([0.0, -0.0, 1e-45, -1e-45, 3.3895e38, float("inf"), float("-inf")]),
    ]).contiguous()
    out = np.empty(x.shape, np.uint16)
    stio.from_f32(x.numpy(), "BF16", out)
    assert np.array_equal(out, _bits(x.to(torch.bfloat16)))
    # and back up: exact
    assert np.array_equal(stio.to_f32(out, "BF16"), x.to(torch.bfloat16).float().numpy())


def test_f16_and_f32_conversions_match_torch():
    x = torch.randn(10_000) * 100
    out = np.empty(x.shape, np.float16)
    stio.from_f32(x.numpy(), "F16", out)
    assert np.array_equal(out, x.to(torch.float16).numpy())
    assert np.array_equal(stio.to_f32(out, "F16"), x.to(torch.float16).float().numpy())


def _file(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    tensors = {  # odd sizes: nothing lines up with 4 KiB blocks or the 16 MiB pieces
        "a.weight": torch.randn(1000, 3001, generator=g).to(torch.bfloat16),  # ~6 MB
        "b.bias": torch.randn(7, generator=g),
        "c.empty": torch.zeros(0, 5, dtype=torch.bfloat16),
        "d.weight": torch.randn(5003, 2000, generator=g).to(torch.bfloat16),  # ~20 MB: two pieces
        "e.ids": torch.arange(11, dtype=torch.int64),
    }
    path = tmp_path / "in.safetensors"
    save_file(tensors, str(path))
    return path, tensors


def _copy(src: Path, dst: Path, whole: set[str]) -> str:
    """Stream every tensor of src into dst (whole ones as arrays, the rest as raw pieces)."""
    reader = stio.Reader(src)
    entries = [(n, reader.header[n]["dtype"], reader.header[n]["shape"]) for n in reader.names]
    writer = stio.Writer(dst, entries)
    pool = stio.BufferPool(8 << 20)
    pieces = reader.stream([(n, n in whole) for n in reader.names], pool)
    try:
        for name in reader.names:
            left = reader.span(name)[1]
            if not left:
                writer.write(name, b"")
            while left:
                got, arr, buf = next(pieces)
                assert got == name
                writer.write(name, arr, release=lambda b=buf: pool.give(b))
                left -= arr.nbytes
        return writer.close()
    finally:
        pieces.close()
        reader.close()


@pytest.mark.parametrize("whole", [set(), {"a.weight", "d.weight", "b.bias"}])
def test_stream_and_write_reproduce_the_file(tmp_path, whole):
    src, tensors = _file(tmp_path)
    dst = tmp_path / "out.safetensors"
    digest = _copy(src, dst, whole)
    assert digest == hashlib.sha256(dst.read_bytes()).hexdigest()
    back = load_file(str(dst))
    assert set(back) == set(tensors)
    for name, t in tensors.items():
        assert torch.equal(back[name], t), name
    header = stio.Reader(dst)
    end = max(i["data_offsets"][1] for i in header.header.values())
    assert dst.stat().st_size == header.data_start + end  # trimmed to size after the last (padded) block
    header.close()


def test_whole_tensors_come_typed_and_shaped(tmp_path):
    src, tensors = _file(tmp_path)
    reader = stio.Reader(src)
    arr = reader.array("a.weight")
    assert arr.shape == (1000, 3001) and arr.dtype == np.uint16
    assert np.array_equal(arr, _bits(tensors["a.weight"]))
    reader.close()


def test_writer_refuses_wrong_order_and_size(tmp_path):
    w = stio.Writer(tmp_path / "x.safetensors", [("a", "F32", [2]), ("b", "F32", [1])])
    with pytest.raises(RuntimeError, match="expected a, got b"):
        w.write("b", np.zeros(1, np.float32))
    w.abort()
    w = stio.Writer(tmp_path / "y.safetensors", [("a", "F32", [2]), ("b", "F32", [1])])
    with pytest.raises(RuntimeError, match="got 12 bytes, expected 8"):
        w.write("a", np.zeros(3, np.float32))
    w.abort()
    w = stio.Writer(tmp_path / "z.safetensors", [("a", "F32", [2]), ("b", "F32", [1])])
    w.write("a", np.zeros(2, np.float32))
    with pytest.raises(RuntimeError, match="not written"):
        w.close()


def test_a_consumer_that_stops_early_releases_the_reader(tmp_path):
    src, _ = _file(tmp_path)
    reader = stio.Reader(src)
    pool = stio.BufferPool(1)  # one buffer out at a time: the producer waits on the consumer
    pieces = reader.stream([(n, False) for n in reader.names], pool)
    next(pieces)  # hold the only buffer and walk away
    done = threading.Event()
    threading.Thread(target=lambda: (pieces.close(), done.set()), daemon=True).start()
    assert done.wait(10), "closing the stream hung on a producer waiting for a buffer"
    reader.close()


def test_filesystem_without_direct_io_falls_back_to_buffered(tmp_path, monkeypatch):
    """Mocked: this machine's filesystems accept O_DIRECT, so a refusing one is simulated by
    making the first write fail with EINVAL, as such filesystems do."""
    try:
        os.close(os.open(tmp_path / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT))
    except OSError:
        pytest.skip("this filesystem has no O_DIRECT: buffered I/O is already the only path here")
    src, tensors = _file(tmp_path)
    real, failed = os.pwrite, []

    def pwrite(fd, data, offset):
        if not failed:
            failed.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)

    monkeypatch.setattr(stio.os, "pwrite", pwrite)
    dst = tmp_path / "out.safetensors"
    digest = _copy(src, dst, {"a.weight"})
    assert failed and digest == hashlib.sha256(dst.read_bytes()).hexdigest()
    assert torch.equal(load_file(str(dst))["d.weight"], tensors["d.weight"])


def test_cpu_stream_merge_does_not_import_torch(tmp_path):
    """torch's import costs 2-3 s cold, longer than a whole 0.5B merge: the CPU path uses numpy."""
    from tests.synthetic import make_adapter, make_base

    base = make_base(tmp_path / "base", shards=2)
    adapter = make_adapter(tmp_path / "adapter", str(base), targets=("q_proj",))
    code = f"""
import sys
from emq.detect import detect
from emq.checkpoint.merge import MergeSettings, merge_adapter
from emq.schema import MergeBase, MergeMethod, ModelConfig
det = detect(ModelConfig(name="t", base={str(base)!r}, adapter={str(adapter)!r}))
merge_adapter(det, ["cpu"], {str(tmp_path / "cache")!r}, settings=MergeSettings(MergeMethod.stream, MergeBase.original))
print("torch" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
