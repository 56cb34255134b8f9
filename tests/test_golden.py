"""The spec's golden vector (section 15): decoded values, and byte-exact reproduction by save."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pytest
import torch

import apr_kernels

# A copy of the spec's 516-byte golden_v2_current.apr (spec 15.2), checked in with the tests.
GOLDEN = Path(__file__).parent / "data" / "golden_v2_current.apr"

META = {"model_type": "linear_regression", "name": "golden-v2", "version": "0.0.0-golden",
        "created_at": "1700000000", "total_size": 0, "param_count": 8}
WEIGHTS = [1.0, 2.0, 0.5, -0.5, 4.0, -2.0, 0.25, 8.0]
JSON = ('{"model_type":"linear_regression","name":"golden-v2","license":null,"data_source":null,'
        '"data_license":null,"version":"0.0.0-golden","created_at":"1700000000","total_size":0,"param_count":8}')


def test_golden_decodes_to_the_spec_values():
    raw = GOLDEN.read_bytes()
    assert len(raw) == 516
    with apr_kernels.open(GOLDEN, verify=True) as f:
        h = f.header
        assert h["magic"] == b"APR\x00" and h["version"] == (2, 0) and h["flags"] == 0x0400
        assert h["data_offset"] == 0x180 and h["has_footer"] and h["footer_crc"] == 0x550F3F35
        assert f.keys() == ["bias", "weights"]
        bias, weights = f.info("bias"), f.info("weights")
        assert (bias.dtype, bias.shape, bias.offset, bias.nbytes) == ("F32", (1,), 0x180, 4)
        assert (weights.dtype, weights.shape, weights.offset, weights.nbytes) == ("F32", (8,), 0x1C0, 32)
        assert f.get_tensor("bias").tolist() == [0.125]
        assert f.get_tensor("weights").tolist() == WEIGHTS
        assert f.metadata == json_loads(JSON)
        assert f.config.model_type == "linear_regression" and f.config.hidden_size is None
    # Header fields the API does not surface, read straight from the bytes (spec 15.3 table).
    count, meta_off, meta_size, index_off, data_off, crc = struct.unpack_from("<IQIQQI", raw, 8)
    assert (count, meta_off, meta_size, index_off, data_off, crc) == (2, 64, 189, 0x100, 0x180, 0x3BC08C02)
    assert raw[64:64 + 189].decode() == JSON
    assert zlib.crc32(raw[:-4]) == 0x550F3F35


def json_loads(s):
    import json

    return json.loads(s)


@pytest.mark.parametrize("order", [("weights", "bias"), ("bias", "weights")])
def test_save_reproduces_the_golden_vector_byte_for_byte(tmp_path, order):
    values = {"weights": torch.tensor(WEIGHTS), "bias": torch.tensor([0.125])}
    out = tmp_path / "golden.apr"
    apr_kernels.save({k: values[k] for k in order}, out, metadata=META)  # insertion order must not matter
    assert out.read_bytes() == GOLDEN.read_bytes()
