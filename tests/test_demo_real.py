"""The demo with its real defaults (int4 smollm2-135m, one backbone offering P = 1, 2, 4 and starting at P=2,
beside int4 qwen2.5-coder-0.5b dense): exported/cached through the same path as `parscale demo`, both panes
answer, the left one at the P chosen per request; a few tokens only."""
import pytest

pytest.importorskip("gradio", reason="the demo extra is not installed: pip install -e '.[demo]'")

from gradio_client import Client  # noqa: E402

from parscale_edge.demo.app import build_app, launch  # noqa: E402
from parscale_edge.demo.models import DEFAULTS, load_pair  # noqa: E402
from parscale_edge.runtime import SamplingConfig  # noqa: E402
from test_demo import answer, reference  # noqa: E402

pytestmark = pytest.mark.slow


def test_default_pair_answers_in_both_panes():
    left, right = load_pair(DEFAULTS.left, None, DEFAULTS.right, None, DEFAULTS.precision, threads=1)
    assert left.ok and right.ok, (left.error, right.error)
    assert (left.P, left.precision, right.P, right.precision) == (2, "int4", 1, "int4")
    assert (left.parallel_choices, right.parallel_choices) == ([1, 2, 4], [1])
    assert left.runtime.manifest.graph == "fused" and left.prefix == {1: 0, 2: 48, 4: 48}
    assert 2 < left.parts_mib < 40  # prefixes + aggregators of P=2 and P=4: a few MiB beside the backbone
    assert 100 < left.file_mib < 300 and 300 < right.file_mib < 1100  # int4 sizes
    # RSS growth at load; after other tests in one pytest process freed pages are reused, so only
    # the order of the two (qwen is 4x smollm2) and a positive size are stable here
    assert right.resident_mib > left.resident_mib > 0
    app = build_app(left, right)
    launch(app, block=False)
    prompt = "Write a Python function that reverses a string."
    try:
        outs = {P: Client(app.local_url, verbose=False).predict(prompt, 4, 0.0, 1.0, 0, P, api_name="/chat")
                for P in (2, 4)}  # a session each: no shared history
    finally:
        app.close()
    for P, out in outs.items():
        for pos, lm, side_P in ((1, left, P), (2, right, 1)):
            tokens, text, _ = reference(lm.runtime, [{"role": "user", "content": prompt}],
                                        SamplingConfig(max_new_tokens=4), parallel=side_P)
            assert len(tokens) == 4 and answer(out[pos]) == text and text.strip()
            assert "**4** tokens" in out[pos + 2] and f"P **{side_P}** · int4" in out[pos + 2]
