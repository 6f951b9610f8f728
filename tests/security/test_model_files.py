"""Issue 6, item 13: model files load without unpickling, and a tampered checkpoint is refused.

The loader itself is covered in tests/model/test_checkpoint.py (test_pickle_files_refused,
test_tampered_weights_refused); here the same files go through the real CLI (``styletag model register``
for the tampered one, ``styletag retag --inline`` with STYLETAG_MODEL pointing at the pickle): one error
line, and a pickle's payload never runs.
"""

from __future__ import annotations

import pickle
import struct

from tests.support.security import assert_one_error_line, catalog_taxonomy, styletag, tiny_checkpoint


class _Boom:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):  # unpickling calls open(marker, "w")
        return (open, (self.marker, "w"))


def test_tampered_checkpoint_refused_by_its_hash(sec, tmp_path):
    path = tmp_path / "tampered.safetensors"
    version = tiny_checkpoint(path, catalog_taxonomy())
    blob = bytearray(path.read_bytes())
    (header_len,) = struct.unpack("<Q", blob[:8])
    data_start = 8 + header_len
    assert len(blob) - data_start > 1000
    blob[data_start + (len(blob) - data_start) // 2] ^= 0x01  # one bit in the middle of the tensor data
    path.write_bytes(bytes(blob))
    # A checkpoint enters service through the registry ('model register' verifies it before recording it);
    # STYLETAG_MODEL only bootstraps an empty registry, and this package's catalog already has a model.
    proc = styletag(sec.env, "model", "register", str(path))
    assert_one_error_line(proc, "was modified", f"recorded model_version {version}")
    listed = styletag(sec.env, "model", "list", "--json")
    assert listed.returncode == 0 and version not in listed.stdout  # nothing was registered


def test_pickle_checkpoint_never_unpickled(sec, tmp_path):
    """(torch.save's zip format is refused the same way: tests/model/test_checkpoint.py.)"""
    marker = tmp_path / "unpickled"
    path = tmp_path / "model.safetensors"  # the name promises safetensors; the bytes are a pickle
    path.write_bytes(pickle.dumps({"state_dict": _Boom(str(marker))}))
    proc = styletag({**sec.env, "STYLETAG_MODEL": str(path)}, "retag", "--all", "--inline")
    assert_one_error_line(proc, "refusing to unpickle")
    assert not marker.exists()
