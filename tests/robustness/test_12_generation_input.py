"""Row 12, generation input: an empty prompt, a prompt longer than the context (an error: the
docs/reliability.md documents that the runtime never truncates silently), max_new_tokens <= 0, a negative or
non-finite temperature, top_p outside (0, 1], out-of-range token ids, non-UTF-8 bytes and lone
surrogates are clear errors, never a crash. Hypothesis fuzzes prompts and sampling settings: the
text is always valid UTF-8 and generation stops within max_new_tokens."""
import io

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from parscale_edge.cli import main
from parscale_edge.runtime import RuntimeInputError, SamplingConfig, sample_next


@pytest.mark.parametrize("kw,msg", [
    (dict(max_new_tokens=0), "max_new_tokens must be >= 1, got 0"),
    (dict(max_new_tokens=-3), "max_new_tokens must be >= 1, got -3"),
    (dict(max_new_tokens=2.5), "max_new_tokens must be an integer, got 2.5"),
    (dict(temperature=-0.1), "temperature must be >= 0, got -0.1"),
    (dict(temperature=float("nan")), "temperature must be a finite number >= 0, got nan"),
    (dict(temperature=float("inf")), "temperature must be a finite number >= 0, got inf"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\], got 0.0"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\], got 1.5"),
    (dict(top_p=float("nan")), r"top_p must be in \(0, 1\], got nan"),
    (dict(top_k=-1), "top_k must be >= 0, got -1"),
    (dict(seed=-5), "seed must be a non-negative integer, got -5"),
])
def test_bad_sampling_settings_are_clear_errors(kw, msg):
    with pytest.raises(ValueError, match=msg):
        SamplingConfig(**kw)


def test_bad_prompts_are_clear_errors(text_export):
    rt = text_export
    ctx = rt.manifest.max_position_embeddings
    with pytest.raises(RuntimeInputError, match="every prompt needs at least one token"):
        rt.generate([[]])
    with pytest.raises(RuntimeInputError, match="every prompt needs at least one token"):
        list(rt.stream_text(""))
    with pytest.raises(RuntimeInputError, match=f"the prompt has {ctx} tokens; the model's context is {ctx} tokens"):
        rt.generate([[5] * ctx])
    with pytest.raises(RuntimeInputError, match=r"token ids must be in \[0, 271\) for this model; got -1..7"):
        rt.generate([[-1, 7]])
    with pytest.raises(RuntimeInputError, match=r"token ids must be in \[0, 271\).*got 3..271"):
        rt.generate([[3, 271]])
    with pytest.raises(ValueError, match=r"lone surrogate U\+DCFF at character 1: it is not valid Unicode"):
        list(rt.stream_text("a\udcffb"))
    # the longest prompt that fits gets exactly the one token that fits after it
    assert len(rt.generate([[5] * (ctx - 1)], SamplingConfig(max_new_tokens=8), eos_token_ids=[])[0]) == 1


def test_cli_bad_prompts_are_one_error_line(text_export, capsys, monkeypatch):
    folder = str(text_export.folder)
    for argv, msg in [(["-p", ""], "every prompt needs at least one token"),
                      (["-p", "a\udcffb"], "lone surrogate U+DCFF"),  # what Python makes of a non-UTF-8 argv byte
                      (["-p", "x" * 300], "the model's context is 256 tokens")]:
        assert main(["generate", "--model", folder, "-n", "2", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and msg in err and "Traceback" not in err, err
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"caf\xe9 au lait"), encoding="utf-8"))
    assert main(["generate", "--model", folder, "-n", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the prompt on stdin is not valid UTF-8 (byte 0xe9 at offset 3)"), err
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO("café".encode()), encoding="utf-8"))
    assert main(["generate", "--model", folder, "-n", "2"]) == 0


def test_chat_reports_a_message_it_cannot_run_and_goes_on(text_export, capsys, monkeypatch):
    """A line that is not UTF-8 (a lone surrogate after surrogateescape) or too long for the context
    is one error line in `chat`; the session continues with the next message."""
    folder = str(text_export.folder)
    lines = b"caf\xe9\n" + b"x" * 300 + b"\nhello\n"
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(lines), encoding="utf-8", errors="surrogateescape"))
    assert main(["chat", "--model", folder, "-n", "2"]) == 0
    out, err = capsys.readouterr()
    errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 2 and "lone surrogate U+DCE9" in errors[0] and "context is 256 tokens" in errors[1], err
    assert "Traceback" not in err and out.count(">>> ") == 4  # three messages read, then end of input


def test_sampling_survives_extreme_settings():
    logits = np.random.default_rng(0).normal(size=(2, 50)).astype(np.float32) * 30
    for cfg in [SamplingConfig(do_sample=True, temperature=1e-300), SamplingConfig(do_sample=True, temperature=1e6),
                SamplingConfig(do_sample=True, top_k=10_000), SamplingConfig(do_sample=True, top_p=1e-12, top_k=1)]:
        t = sample_next(logits, cfg, np.random.default_rng(1))
        assert t.shape == (2,) and ((0 <= t) & (t < 50)).all()
    tiny_t = sample_next(logits, SamplingConfig(do_sample=True, temperature=1e-300), np.random.default_rng(1))
    assert tiny_t.tolist() == logits.argmax(-1).tolist()  # a vanishing temperature is greedy


# ---------------------------------------------------------------------------------------- fuzzing
_sampling = st.builds(
    SamplingConfig,
    max_new_tokens=st.integers(1, 12),
    do_sample=st.booleans(),
    temperature=st.one_of(st.just(0.0), st.floats(1e-30, 100.0), st.floats(0.05, 2.0)),
    top_k=st.integers(0, 400),
    top_p=st.floats(1e-9, 1.0, exclude_min=False),
    seed=st.integers(0, 2**32),
)
_text = st.text(alphabet=st.characters(codec="utf-8"), max_size=60)  # any valid Unicode scalar


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(prompt=_text, sampling=_sampling, chat=st.booleans())
def test_fuzz_text_is_utf8_and_generation_stops_in_time(text_export, prompt, sampling, chat):
    rt = text_export
    try:
        pieces = list(rt.stream_text(prompt, sampling, chat=chat))
    except RuntimeInputError as e:  # the only expected refusals: empty or too-long prompts
        assert "at least one token" in str(e) or "context is" in str(e)
        assert not prompt or len(prompt.encode()) > 50
        return
    text = "".join(pieces)
    text.encode("utf-8")  # raises on a lone surrogate: the decoder never emits half a character
    ids = rt.tokenizer.encode(rt.tokenizer.apply_chat_template([{"role": "user", "content": prompt}]) if chat else prompt)
    steps = list(rt.generate_tokens([ids], sampling))
    assert 1 <= len(steps) <= sampling.max_new_tokens
    assert all(s.shape == (1,) and (s[0] == -1 or 0 <= s[0] < rt.manifest.vocab_size) for s in steps)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompts=st.lists(st.lists(st.integers(0, 270), min_size=1, max_size=20), min_size=1, max_size=4),
       sampling=_sampling, eos=st.lists(st.integers(0, 270), max_size=3))
def test_fuzz_token_batches_stop_within_max_new_tokens(text_export, prompts, sampling, eos):
    rt = text_export
    out = rt.generate(prompts, sampling, eos_token_ids=eos)
    assert len(out) == len(prompts)
    for row in out:
        assert 1 <= len(row) <= sampling.max_new_tokens
        assert all(0 <= t < rt.manifest.vocab_size for t in row)
        stops = [i for i, t in enumerate(row) if t in eos]
        assert not stops or stops[0] == len(row) - 1  # nothing after the first eos


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(before=_text, after=_text, surrogate=st.integers(0xD800, 0xDFFF))
def test_fuzz_lone_surrogates_are_always_the_same_clear_error(text_export, before, after, surrogate):
    with pytest.raises(ValueError, match=rf"lone surrogate U\+{surrogate:04X} at character {len(before)}"):
        list(text_export.stream_text(before + chr(surrogate) + after, SamplingConfig(max_new_tokens=1)))
