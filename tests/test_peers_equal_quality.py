"""bench/peers/equal_quality.py puts each peer's quality beside its paired speed ratios."""

import pytest
from bench_script import load_bench


def speed(threads, ours_ok=True):
    summ = lambda tg, pp: {"summary": {"decode_tokens_per_s": tg, "prefill_tokens_per_s": pp}, "status": "ok"}  # noqa: E731
    return {"settings": {"threads": threads}, "machine": {"cpu": "x"},
            "results": [{"peer": "ours-int4", **summ(100.0, 400.0)} if ours_ok else {"peer": "ours-int4", "status": "failed"},
                        {"peer": "llama.cpp", **summ(90.0, 200.0)},
                        {"peer": "ort-genai-int8", "status": "failed"}],
            "paired_ratios": {"ours-int4/llama.cpp": {"decode_median": 1.11, "decode_per_round": [1.05, 1.11, 1.2],
                                                      "prefill_median": 2.0, "prefill_per_round": [2.0]}}}


QUALITY = {"results": {"ours-int4": {"perplexity_change_pct": -0.04, "kl_mean": 0.0032, "top1_agreement": 0.971,
                                     "positions": 4096, "window": 512, "stride": 256},
                       "llama.cpp": {"perplexity_change_pct": 0.06, "kl_mean": 0.0028, "top1_agreement": 0.970}}}


def test_rows_carry_quality_and_per_thread_ratios():
    eq = load_bench("peers/equal_quality.py")
    doc = eq.merge([speed(1), speed(2)], QUALITY)
    rows = {r["runtime"]: r for r in doc["rows"]}
    assert doc["threads"] == [1, 2] and doc["quality_settings"]["positions"] == 4096
    assert rows["llama.cpp"]["perplexity_change_pct"] == 0.06
    assert rows["llama.cpp"]["speed"][2]["ours_int4_over_it_decode"] == 1.11
    assert rows["llama.cpp"]["speed"][2]["decode_range"] == [1.05, 1.2]
    assert rows["ort-genai-int8"]["speed"][1] == {"status": "failed"}
    assert rows["ort-genai-int4"]["speed"][1] == {"status": "missing"} and rows["ort-genai-int4"]["kl_mean"] is None
    md = eq.markdown(doc)
    assert "| llama.cpp | +0.06% | 0.0028 | 97.0% | 90.0 | 1.11 (1.05..1.20) | 2.00 |" in md


def test_a_speed_run_without_ours_is_refused():
    with pytest.raises(ValueError, match="2-thread speed JSON has no successful ours-int4"):
        load_bench("peers/equal_quality.py").merge([speed(1), speed(2, ours_ok=False)], QUALITY)


def test_wrong_or_swapped_inputs_name_the_file(tmp_path):
    import json

    eq = load_bench("peers/equal_quality.py")
    q = tmp_path / "quality.json"
    q.write_text(json.dumps(QUALITY))
    s = tmp_path / "speed.json"
    s.write_text(json.dumps(speed(1)))
    with pytest.raises(ValueError, match=r"--speed .*quality.json: not a bench/peers/run.py result \(no settings\)"):
        eq.read_inputs([str(q)], str(s))  # swapped
    (tmp_path / "README.md").write_text("# not json")
    with pytest.raises(ValueError, match=r"--speed .*README.md: cannot read it as JSON"):
        eq.read_inputs([str(tmp_path / "README.md")], str(q))
    bad_q = tmp_path / "list.json"
    bad_q.write_text(json.dumps({"results": [1, 2]}))
    with pytest.raises(ValueError, match="--quality .*list.json: not a bench/peers/quality.py result"):
        eq.read_inputs([str(s)], str(bad_q))
    q_with_settings = tmp_path / "q2.json"
    q_with_settings.write_text(json.dumps({**QUALITY, "settings": {"positions": 4096}}))  # quality.py's own shape
    with pytest.raises(ValueError, match="--speed .*q2.json: not a bench/peers/run.py result"):
        eq.read_inputs([str(q_with_settings)], str(q))
    docs, quality = eq.read_inputs([str(s)], str(q))
    assert docs[0]["settings"]["threads"] == 1 and quality == QUALITY
