"""The result tables (parscale_edge.report): markdown shows what varies, csv and json the raw values."""
import csv
import io
import json

import pytest

from parscale_edge.cli import main
from parscale_edge.report import (Column, Table, compare_table, fit_table, format_table, predict_table,
                                  profile_table, versus_dense_table)

#: two rows as `parscale profile` writes them (profile_folder's keys plus model, kind, P, folder)
PROFILE_ROWS = [
    {"model": "smollm2-135m", "kind": "parscale", "P": 1, "precision": "fp32", "batch": 1, "prompt_len": 64,
     "ttft_ms": 41.2, "prefill_tokens_per_s": 1553.4, "decode_ms_p50": 12.34, "decode_ms_p90": 13.01,
     "decode_tokens_per_s": 81.03, "peak_rss_mib": 702.4, "file_mib": 513.2, "load_rss_ratio": 1.26,
     "kv_cache_mib": 3.75, "bandwidth_share": 0.42, "provider": "CPUExecutionProvider", "cache_dtype": "float32",
     "folder": "/cache/onnx/smollm2-135m-p1-fp32"},
    {"model": "smollm2-135m", "kind": "parscale", "P": 2, "precision": "fp32", "batch": 1, "prompt_len": 64,
     "ttft_ms": 70.6, "prefill_tokens_per_s": 906.5, "decode_ms_p50": 15.5, "decode_ms_p90": 16.25,
     "decode_tokens_per_s": 64.52, "peak_rss_mib": 731.0, "file_mib": 513.2, "load_rss_ratio": None,
     "kv_cache_mib": 8.5, "bandwidth_share": 0.35, "provider": "CPUExecutionProvider", "cache_dtype": "float32",
     "folder": "/cache/onnx/smollm2-135m-p1-2-fp32"},
]


def test_profile_markdown_is_the_table_printed_before_and_hides_columns_that_do_not_vary():
    md = format_table(profile_table(PROFILE_ROWS), "md").splitlines()
    assert md[0] == ("| model | kind | P | precision | batch | prompt | TTFT ms | prefill tok/s | decode ms p50/p90 | "
                     "decode tok/s | peak RSS MiB | file MiB | load RSS / file | KV MiB | bw share |")
    assert md[1] == "| " + " | ".join(["---"] * 15) + " |"
    assert md[2] == ("| smollm2-135m | parscale | 1 | fp32 | 1 | 64 | 41 | 1553 | 12.3/13.0 | 81.0 | 702 | 513 | "
                     "1.26x | 3.8 | 42% |")
    assert md[3] == ("| smollm2-135m | parscale | 2 | fp32 | 1 | 64 | 71 | 906 | 15.5/16.2 | 64.5 | 731 | 513 | "
                     "nanx | 8.5 | 35% |")
    assert len(md) == 4
    rows = [dict(PROFILE_ROWS[0]), dict(PROFILE_ROWS[1], provider="CUDAExecutionProvider")]
    md = format_table(profile_table(rows), "md").splitlines()
    assert md[0].endswith("| bw share | provider |") and md[3].endswith("| 35% | CUDAExecutionProvider |")


def test_profile_csv_and_json_hold_every_column_raw():
    text = format_table(profile_table(PROFILE_ROWS), "csv")
    got = list(csv.DictReader(io.StringIO(text)))
    assert text.splitlines()[0] == ("model,kind,P,precision,batch,prompt_len,ttft_ms,prefill_tokens_per_s,"
                                    "decode_ms_p50,decode_ms_p90,decode_tokens_per_s,peak_rss_mib,file_mib,"
                                    "load_rss_ratio,kv_cache_mib,bandwidth_share,provider,cache_dtype")
    assert [r["P"] for r in got] == ["1", "2"] and got[0]["decode_ms_p50"] == "12.34"
    assert got[1]["load_rss_ratio"] == "" and got[1]["provider"] == "CPUExecutionProvider"
    assert "folder" not in got[0]  # not a column of the table (profile.csv in the results folder has it)
    js = json.loads(format_table(profile_table(PROFILE_ROWS), "json"))
    assert js[1] == {k: PROFILE_ROWS[1][k] for k in js[1]} and len(js[1]) == 18 and js[1]["load_rss_ratio"] is None


def test_versus_dense_markdown_keeps_its_title_and_ratio_cells():
    summary = [{"precision": "fp32", "batch": 1, "prompt_len": 64, "P": 2, "parscale_memory_increase_mib": 28.6,
                "dense_memory_increase_mib": 130.2, "parscale_latency_increase_ms": 400.4,
                "dense_latency_increase_ms": 1010.0, "dense_layers": 40, "memory_ratio": 4.552, "latency_ratio": None}]
    md = format_table(versus_dense_table(summary), "md").splitlines()
    assert md[0].startswith("ParScale against parameter scaling (increase over P=1;")
    assert md[1] == ("| precision | batch | P | memory +MiB ParScale / dense (ratio) | "
                     "latency +ms ParScale / dense (ratio) |")
    assert md[3] == "| fp32 | 1 | 2 | 29 / 130 (4.6x) | 400 / 1010 (n/a) |"
    assert format_table(versus_dense_table(summary), "csv").splitlines()[1] == "fp32,1,2,28.6,130.2,4.552,400.4,1010.0,"


def test_scaling_law_tables():
    fit = [{"dataset": "pile", "runs": 24, "E": 1.8, "A": 1.3e7, "k": 0.334, "alpha": 0.196, "r2": 0.999,
            "paper_E": None, "paper_A": None, "paper_k": None, "paper_alpha": None}]
    md = format_table(fit_table(fit, "fit title"), "md").splitlines()
    assert md[0] == "fit title" and md[3] == "| pile | 24 | 1.8000 | 1.3e+07 | 0.3340 | 0.1960 | 0.9990 | - | - | - | - |"
    assert "fit title" not in format_table(fit_table(fit, "fit title"), "csv")
    rows = [{"P": 1, "loss": 1.23456, "gain": 1.0, "dense_equivalent_params": 1.6e9},
            {"P": 8, "loss": 1.1, "gain": 1.817, "dense_equivalent_params": 2.9e9}]
    md = format_table(predict_table(rows), "md").splitlines()
    assert md[0] == "| P | predicted loss | gain k ln P + 1 | dense equivalent (non-embedding) |"
    assert md[2:] == ["| 1 | 1.2346 | 1.000x | 1.6e+09 |", "| 8 | 1.1000 | 1.817x | 2.9e+09 |"]
    assert json.loads(format_table(predict_table(rows), "json")) == rows


def test_compare_row_and_format_errors():
    r = {"reference": "a", "candidate": "b", "reference_parallel": 1, "candidate_parallel": 2,
         "reference_precision": "fp32", "candidate_precision": "int4", "positions": 100, "kl_mean": 0.012341,
         "kl_p99": 0.1, "kl_max": 0.5, "top1_agreement": 0.9712, "ref_perplexity": 3.0, "cand_perplexity": 3.1}
    md = format_table(compare_table([r]), "md").splitlines()
    assert md[2] == "| a | 1 | fp32 | b | 2 | int4 | 100 | 0.01234 | 0.10000 | 0.5000 | 97.12% | 3.0000 | 3.1000 |"
    assert json.loads(format_table(compare_table([r]), "json")) == [r]
    with pytest.raises(ValueError, match="unknown table format 'xml'"):
        format_table(compare_table([r]), "xml")
    t = Table([Column("a", ("a",)), Column("b", ("b",), always=False)], [{"a": 1, "b": 2}, {"a": 2, "b": 2}])
    assert format_table(t, "md") == "| a |\n| --- |\n| 1 |\n| 2 |\n"  # b is the same in every row


def test_scaling_law_command_prints_each_format(capsys):
    assert main(["scaling-law", "predict", "-N", "1.6B", "-P", "1,8", "--format", "csv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "P,loss,gain,dense_equivalent_params" and [ln.split(",")[0] for ln in lines[1:]] == ["1", "8"]
    assert main(["scaling-law", "predict", "-N", "1.6B", "-P", "1,8", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["P"] for r in rows] == [1, 8] and rows[1]["dense_equivalent_params"] / 1.6e9 == pytest.approx(1.818, abs=1e-3)
    assert main(["scaling-law", "predict", "-N", "1.6B", "-P", "1,8"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "stack-v2-python law (paper constants): N = 1.6e+09 non-embedding parameters"
    assert out[1] == "| P | predicted loss | gain k ln P + 1 | dense equivalent (non-embedding) |"
