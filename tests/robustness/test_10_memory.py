"""Row 10, memory at load: the profiler reports the session's peak RSS against the weight file; on
smollm2-135m it stays under 1.3x (slow). Weights larger than the free memory are refused before
ONNX Runtime starts (the kernel would kill the process without a message)."""
import pytest

from parscale_edge import validate
from parscale_edge.profile import profile_folder
from parscale_edge.runtime import OnnxCausalLM
from parscale_edge.validate import LOAD_MEMORY_FACTOR, ExportFolderError


def test_profiler_reports_load_memory_against_the_weight_file(tiny_exports):
    _, rt = tiny_exports[2]
    row = profile_folder(rt.folder, batches=[1], prompt_lens=[4], gen_len=2, threads=1, repeat=1, warmup=0)[0]
    assert row["load_rss_increase_mib"] > 0
    assert row["load_rss_ratio"] == pytest.approx(row["load_rss_increase_mib"] / row["file_mib"])
    assert row["peak_rss_load_mib"] >= row["rss_before_mib"] + row["load_rss_increase_mib"] - 1e-6


def test_weights_larger_than_free_memory_are_refused_before_loading(tiny_exports, monkeypatch):
    _, rt = tiny_exports[2]
    size = (rt.folder / "model.onnx.data").stat().st_size
    monkeypatch.setattr(validate, "available_memory_bytes", lambda: size // 2)
    with pytest.raises(ExportFolderError, match=r"loading needs about .* MiB .* but only 0 MiB of memory is available; "
                                                r"close other programs, or quantize it .*--precision int4"):
        OnnxCausalLM(rt.folder, "cpu", 1)
    monkeypatch.setenv(validate.SKIP_MEMORY_CHECK_ENV, "1")  # the documented escape hatch
    OnnxCausalLM(rt.folder, "cpu", 1)
    monkeypatch.delenv(validate.SKIP_MEMORY_CHECK_ENV)
    monkeypatch.setattr(validate, "available_memory_bytes", lambda: int(size * (1 + LOAD_MEMORY_FACTOR) / 2))
    with pytest.warns(UserWarning, match="may run out of memory"):
        OnnxCausalLM(rt.folder, "cpu", 1)


def test_available_memory_is_read_from_proc():
    free = validate.available_memory_bytes()
    assert free is None or free > 2**20


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_real_model_session_peak_rss_stays_under_1_3x_the_weight_file(precision):
    from parscale_edge.prepare import ensure_export
    from parscale_edge.profile import quantized_folder

    folder = quantized_folder(ensure_export("smollm2-135m", 1, threads=1, progress=False), precision, threads=1)
    row = profile_folder(folder, batches=[1], prompt_lens=[8], gen_len=2, threads=1, repeat=1, warmup=0)[0]
    assert row["file_mib"] > 150
    assert row["load_rss_ratio"] < LOAD_MEMORY_FACTOR, row  # measured 1.26 (fp32), 0.89 (int4)
    print(precision, f"{row['load_rss_ratio']:.2f}x of {row['file_mib']:.0f} MiB")


# --------------------------------------------- the KV cache of a request (issue 15: checked before allocating)
@pytest.fixture(scope="module")
def fused_p2(tmp_path_factory):
    from parscale_edge.export import export_model
    from tiny import tiny_model

    return export_model(tiny_model("qwen2", 2, seed=1), tmp_path_factory.mktemp("kv") / "fused")


@pytest.mark.parametrize("kind", ["fused", "reference"])
def test_a_kv_cache_larger_than_free_memory_is_refused_before_allocating(tiny_exports, fused_p2, kind, monkeypatch):
    from parscale_edge.runtime import SamplingConfig
    from parscale_edge.validate import MemoryCheckError

    rt = OnnxCausalLM(fused_p2 if kind == "fused" else tiny_exports[2][1].folder, "cpu", 1)
    monkeypatch.setattr(validate, "available_memory_bytes", lambda: 50_000)
    with pytest.raises(MemoryCheckError, match=r"the KV cache of this request needs .* MiB \(P=2 x 1 row\(s\) x \d+ "
                                               r"slots x 2 layers, float32\) but only 0 MiB of memory is available; "
                                               r"ask for fewer new tokens \(-n / max_new_tokens\) or a smaller P"):
        rt.generate([[1, 2, 3]], SamplingConfig(max_new_tokens=10**9))
    assert rt.generate([[1, 2, 3]], SamplingConfig(max_new_tokens=2), eos_token_ids=[])[0]  # a small request fits
    monkeypatch.setenv(validate.SKIP_MEMORY_CHECK_ENV, "1")
    rt.generate([[1, 2, 3]], SamplingConfig(max_new_tokens=10), eos_token_ids=[])


def test_cli_names_the_kv_cache_size_and_the_fix(text_export, monkeypatch, capsys):
    from parscale_edge.cli import main

    calls = iter([10**12])  # the weights fit; the cache does not
    monkeypatch.setattr(validate, "available_memory_bytes", lambda: next(calls, 10_000))
    capsys.readouterr()
    assert main(["generate", "-m", str(text_export.folder), "-p", "hi", "-n", "1e9"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the KV cache of this request needs") and "fewer new tokens" in err
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("cmd", [["export", "{src}", "-o", "{out}", "-P", "1000"],
                                 ["export", "{src}", "-o", "{out}", "-P", "1,2,65"],
                                 ["convert", "{src}", "-o", "{out}", "-P", "1000"],
                                 ["generate", "-m", "{src}", "-P", "1000", "-p", "hi"]])
def test_parallel_is_bounded_before_any_work(tmp_path, cmd, capsys):
    from parscale_edge.cli import main

    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    capsys.readouterr()
    assert main([c.format(src=src, out=tmp_path / "out") for c in cmd]) == 2
    err = capsys.readouterr().err
    assert "is above the supported 64" in err and "multiplies the KV cache" in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()
