"""parscale_edge.prepare: P read and checked in one place, one cache naming scheme."""
import pytest

from parscale_edge.prepare import (ParallelError, PrepareError, cache_name, check_parallel, export_cache_folder,
                                   normalize_parallel, parse_parallel)


def test_parse_and_check_parallel():
    assert parse_parallel("4,1,2") == [4, 1, 2] and parse_parallel(" 2 ") == [2] and parse_parallel(3) == [3]
    with pytest.raises(ParallelError, match=r"^P takes comma-separated integers, got '2,x'$") as e:
        parse_parallel("2,x")
    assert e.value.naming("--left-parallel") == "--left-parallel takes comma-separated integers, got '2,x'"
    with pytest.raises(ParallelError, match=r"^P needs positive integers, got '0'$"):
        parse_parallel("0")
    check_parallel(None), check_parallel(64), check_parallel([1, 2])
    with pytest.raises(ParallelError, match=r"^P must be >= 1, got 0$"):
        check_parallel(0)
    with pytest.raises(ParallelError, match=r"^P 65 is above the supported 64") as e:
        check_parallel([2, 65])
    assert e.value.naming("--parallel").startswith("--parallel 65 is above the supported 64")
    assert issubclass(ParallelError, PrepareError) and issubclass(PrepareError, ValueError)


def test_normalize_parallel():
    assert normalize_parallel(None) is None and normalize_parallel(2) == 2 and normalize_parallel([4]) == 4
    assert normalize_parallel((4, 1, 2, 2)) == [1, 2, 4]
    assert normalize_parallel(None, adapters=["a"]) == 1 and normalize_parallel(2, adapters=["a"]) == [1, 2]


def test_one_cache_naming_scheme(tmp_path, monkeypatch):
    monkeypatch.setenv("PARSCALE_EDGE_CACHE", str(tmp_path))
    assert cache_name("m") == "m-fp32" and cache_name("m", 2, "fp16") == "m-p2-fp16"
    assert cache_name("m", [4, 1, 2, 2], "int4", variant="cost") == "m-p1-2-4-int4-cost"
    a = tmp_path / "a.safetensors"
    a.write_bytes(b"x")
    name = cache_name("m", [1, 2], "int4", adapters=[a])
    assert name.startswith("m-p1-2-a") and name.endswith("-int4") and len(name) == len("m-p1-2-a") + 10 + 5
    assert export_cache_folder("smollm2-135m") == tmp_path / "onnx" / "smollm2-135m-p1-fp32"
    assert export_cache_folder("smollm2-135m", [2, 1], "int4").name == "smollm2-135m-p1-2-int4"
    assert export_cache_folder("smollm2-135m", None, "fp32", variant="dense-twin-L40").name == \
        "smollm2-135m-p1-fp32-dense-twin-L40"
