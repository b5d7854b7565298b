"""The demo with its real defaults (int4 smollm2-135m P=2 conversion beside int4 qwen2.5-coder-0.5b dense):
exported/cached through the same path as `parscale demo`, both panes answer, a few tokens only."""
import pytest

pytest.importorskip("gradio", reason="the demo extra is not installed: pip install -e '.[demo]'")

from gradio_client import Client  # noqa: E402

from demo.app import build_app, launch  # noqa: E402
from demo.models import DEFAULTS, load_pair  # noqa: E402
from edge.runtime import SamplingConfig  # noqa: E402
from test_demo import answer, reference  # noqa: E402

pytestmark = pytest.mark.slow


def test_default_pair_answers_in_both_panes():
    left, right = load_pair(DEFAULTS.left, None, DEFAULTS.right, None, DEFAULTS.precision, threads=1)
    assert left.ok and right.ok, (left.error, right.error)
    assert (left.P, left.precision, right.P, right.precision) == (2, "int4", 1, "int4")
    assert 150 < left.file_mib < 300 and 700 < right.file_mib < 1100  # int4 sizes (README: 228 and 933 MiB)
    assert right.resident_mib > left.resident_mib > 50
    app = build_app(left, right)
    launch(app, block=False)
    prompt = "Write a Python function that reverses a string."
    try:
        out = Client(app.local_url, verbose=False).predict(prompt, 4, 0.0, 1.0, 0, api_name="/chat")
    finally:
        app.close()
    for pos, lm in ((1, left), (2, right)):
        tokens, text, _ = reference(lm.runtime, [{"role": "user", "content": prompt}], SamplingConfig(max_new_tokens=4))
        assert len(tokens) == 4 and answer(out[pos]) == text and text.strip()
        assert "**4** tokens" in out[pos + 2] and f"P **{lm.P}** · int4" in out[pos + 2]
