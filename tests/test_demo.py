"""The Gradio demo served in-process on two tiny exports (left one backbone offering P = 1, 2, 4 and starting
at P=2, right dense), driven with gradio_client: streaming, equality with the runtime's own generate() at the
chosen P, sessions (with different P at once), Stop, bad input, the profile panel."""
from __future__ import annotations

import re
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest

pytest.importorskip("gradio", reason="the demo extra is not installed: pip install -e '.[demo]'")

from gradio_client import Client  # noqa: E402

from parscale_edge.demo.app import build_app, launch  # noqa: E402
from parscale_edge.demo.models import load_demo_model, load_pair  # noqa: E402
from parscale_edge.demo.streaming import Answer, take_turns  # noqa: E402
from parscale_edge.cli import main  # noqa: E402
from parscale_edge.runtime import RuntimeInputError, SamplingConfig  # noqa: E402
from parscale_edge.tokenizer import StreamDecoder  # noqa: E402
from tiny_gguf import write_tiny_gguf  # noqa: E402

LEFT, RIGHT, STATUS = 1, 2, 5  # output positions: textbox, left pane, right pane, left numbers, right numbers, status


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """Two tiny exports: left one fused llama-family backbone offering P = 1, 2, 4 (conversions of the
    dense model with 3 prefix tokens, as `parscale export -P 1,2,4` writes), right a qwen2-family
    dense model."""
    from parscale_edge.loading import convert_to_parscale
    from parscale_edge.loading import load_model as load_checkpoint
    from parscale_edge.export import export_model

    root = tmp_path_factory.mktemp("demo")
    write_tiny_gguf(root / "a.gguf", "llama", seed=0)
    write_tiny_gguf(root / "b.gguf", "qwen2", seed=1)
    dense = load_checkpoint(root / "a.gguf", progress=False)
    export_model(dense, root / "left", graph="fused", extra_parallel=[convert_to_parscale(dense, P, n_tokens=3) for P in (2, 4)])
    assert main(["-q", "export", str(root / "b.gguf"), "-o", str(root / "right")]) == 0
    return root / "left", root / "right"


@pytest.fixture(scope="module")
def served(tiny_pair, tmp_path_factory):
    """The demo over the tiny pair: left offers P 1, 2, 4 and starts at P=2, right is dense."""
    mp = pytest.MonkeyPatch()
    mp.setenv("PARSCALE_EDGE_CACHE", str(tmp_path_factory.mktemp("cache")))
    left, right = load_pair(str(tiny_pair[0]), [2, 1, 4], str(tiny_pair[1]), None, "int4", threads=1,
                            log=lambda m: None)
    assert left.ok and right.ok and (left.P, right.P) == (2, 1)
    assert (left.parallel_choices, right.parallel_choices) == ([1, 2, 4], [1])
    app = build_app(left, right, concurrency=3, max_new_tokens=64, threads=1)
    launch(app, block=False)
    yield SimpleNamespace(app=app, url=app.local_url, models={"left": left, "right": right})
    app.close()
    mp.undo()


def text_of(message: dict) -> str:
    c = message["content"]
    return c if isinstance(c, str) else "".join(part.get("text", "") for part in c)


def answer(pane: list[dict]) -> str:
    assert pane and pane[-1]["role"] == "assistant"
    return text_of(pane[-1])


def reference(rt, messages, sampling, parallel=None):
    """The runtime's own answer at P = ``parallel`` (None: its default): (generate() tokens, their text,
    the text after each token)."""
    tok = rt.tokenizer
    ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True))
    tokens = rt.generate([ids], sampling, parallel=parallel)[0]
    dec, text, growth = StreamDecoder(tok), "", []
    for t in tokens:
        if t in rt.manifest.eos_token_ids:
            break
        text += dec.put(t)
        growth.append(text)
    text += dec.flush()  # a character left incomplete by the last token
    growth.append(text)
    return tokens, text, growth


def distinct(seq):
    out = []
    for x in seq:
        if not out or x != out[-1]:
            out.append(x)
    return out


def counting(rt, mp, delay=0.0):
    """Wrap ``rt.generate_tokens``: count the steps the demo consumes, generators closed, most at once,
    and the P each request asked for."""
    c = SimpleNamespace(steps=0, closed=0, active=0, most_active=0, parallel=[], lock=threading.Lock())
    orig = rt.generate_tokens

    def wrapped(*args, **kw):
        gen = orig(*args, **kw)
        with c.lock:
            c.parallel.append(kw.get("parallel"))
            c.active += 1
            c.most_active = max(c.most_active, c.active)
        try:
            for step in gen:
                time.sleep(delay)
                with c.lock:
                    c.steps += 1
                yield step
        finally:
            gen.close()
            with c.lock:
                c.active -= 1
                c.closed += 1

    mp.setattr(rt, "generate_tokens", wrapped)
    return c


def kv_mib(rt, P, slots):
    """KV cache of ``slots`` positions at P streams (float32, both k and v, every layer), MiB."""
    m = rt.manifest
    return 2 * m.num_layers * P * m.num_key_value_heads * m.head_dim * slots * 4 / 2**20


@pytest.mark.parametrize("temperature,top_p,seed,P", [(0.0, 1.0, 0, 2), (0.8, 0.9, 7, 2), (0.0, 1.0, 0, 4)])
def test_panes_stream_token_by_token_and_end_as_generate(served, temperature, top_p, seed, P):
    prompt, n = "hello world", 40
    sampling = SamplingConfig(max_new_tokens=n, do_sample=temperature > 0, temperature=temperature, top_p=top_p,
                              seed=seed)
    job = Client(served.url, verbose=False).submit(prompt, n, temperature, top_p, seed, P, api_name="/chat")
    final = job.result(timeout=120)
    outs = job.outputs()
    for side, pos, side_P in (("left", LEFT, P), ("right", RIGHT, 1)):
        rt = served.models[side].runtime
        tokens, text, growth = reference(rt, [{"role": "user", "content": prompt}], sampling, parallel=side_P)
        assert len(tokens) > 10
        assert text_of(final[pos][0]) == prompt and answer(final[pos]) == text
        seen = distinct(answer(o[pos]) for o in outs)
        # one update per token: the pane went through exactly the texts the decoder produced after each token
        assert seen == distinct([""] + growth)
        numbers = final[pos + 2]
        assert f"**{len(tokens)}** tokens" in numbers and f"P **{side_P}** · fp32" in numbers
        assert "TTFT **" in numbers and " tok/s" in numbers
        # fused graphs preallocate prefix + prompt + max new tokens for every stream
        ids = rt.tokenizer.encode(rt.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                                   add_generation_prompt=True))
        slots = (3 if side_P > 1 else 0) + len(ids) + n
        assert f"KV cache {kv_mib(rt, side_P, slots):.1f} MiB" in numbers
    assert "one backbone serves P = 1, 2, 4" in final[LEFT + 2] and "one backbone" not in final[RIGHT + 2]
    assert final[STATUS] == "" and final[0] == ""


def test_p_control_offers_the_left_folders_p(served):
    radios = {b.elem_id: b for b in served.app.blocks.values() if getattr(b, "elem_id", None) in ("P-left", "P-right")}
    left, right = radios["P-left"], radios["P-right"]
    assert [v for _, v in left.choices] == [1, 2, 4] and left.value == 2 and left.visible
    assert [v for _, v in right.choices] == [1] and right.value == 1 and not right.visible  # one P: no control
    lm = served.models["left"]
    # one backbone for every P: the three part files are a small share of the folder
    parts = sorted(p.name for p in (lm.folder / "parscale").iterdir())
    assert parts == ["p2.safetensors", "p4.safetensors"] and lm.prefix == {1: 0, 2: 3, 4: 3}
    assert lm.parts_mib == pytest.approx(sum((lm.folder / "parscale" / f).stat().st_size for f in parts) / 2**20)
    backbone = sum((lm.folder / f).stat().st_size for f in ("model.onnx", "model.onnx.data")) / 2**20
    assert lm.file_mib == pytest.approx(backbone + lm.parts_mib) and 0 < lm.parts_mib < 0.5 * lm.file_mib
    numbers = Client(served.url, verbose=False).predict(1, 1, api_name="/clear")[2]
    assert "tokens –" in numbers and "P **1** · fp32" in numbers  # before an answer: the selected P
    with pytest.raises(Exception, match=r"not in the list of choices: \[1, 2, 4\]"):
        Client(served.url, verbose=False).predict("hello", 4, 0.0, 1.0, 0, 3, api_name="/chat")
    with pytest.raises(RuntimeInputError, match=r"offers P in \[1, 2, 4\], not P=3"):  # behind the control, too
        Answer(lm.runtime, [{"role": "user", "content": "hello"}], SamplingConfig(max_new_tokens=4), 3)


def test_two_sessions_with_different_p_at_once_get_their_own_p(served):
    """Same prompts, P=1 in one session and P=4 in the other, decoding at the same time on one runtime:
    each gets exactly the answers of its own P (they differ), and its numbers say which P."""
    prompts, n = ("hello", "count to ten"), 24
    rt = served.models["left"].runtime
    sampling = SamplingConfig(max_new_tokens=n)
    expected = {}
    for P in (1, 4):
        a1 = reference(rt, [{"role": "user", "content": prompts[0]}], sampling, parallel=P)[1]
        a2 = reference(rt, [{"role": "user", "content": prompts[0]}, {"role": "assistant", "content": a1},
                            {"role": "user", "content": prompts[1]}], sampling, parallel=P)[1]
        expected[P] = (a1, a2)
    assert expected[1][0] != expected[4][0] and expected[1][1] != expected[4][1]  # mixing them would show

    mp = pytest.MonkeyPatch()
    counter = counting(rt, mp, delay=0.005)
    barrier = threading.Barrier(2)

    def session(P):
        client = Client(served.url, verbose=False)
        barrier.wait()
        return [client.predict(msg, n, 0.0, 1.0, 0, P, api_name="/chat") for msg in prompts]

    try:
        with ThreadPoolExecutor(2) as ex:
            results = dict(zip((1, 4), ex.map(session, (1, 4))))
    finally:
        mp.undo()
    for P, (turn1, turn2) in results.items():
        assert answer(turn1[LEFT]) == expected[P][0]
        assert [text_of(m) for m in turn2[LEFT]] == [prompts[0], expected[P][0], prompts[1], expected[P][1]]
        assert f"P **{P}** · fp32" in turn1[LEFT + 2] and f"P **{P}** · fp32" in turn2[LEFT + 2]
    assert counter.most_active == 2  # both sessions decoded at the same time
    assert sorted(counter.parallel) == [1, 1, 4, 4] and counter.active == 0 and counter.closed == 4


def test_three_concurrent_sessions_get_their_own_answers(served):
    prompts = [("hello", "world 12"), ("count to ten", "hello world"), ("world 12", "hello")]
    n = 24
    sampling = SamplingConfig(max_new_tokens=n)
    expected = []
    for first, second in prompts:
        exp = {}
        for side in ("left", "right"):
            rt = served.models[side].runtime
            a1 = reference(rt, [{"role": "user", "content": first}], sampling)[1]
            a2 = reference(rt, [{"role": "user", "content": first}, {"role": "assistant", "content": a1},
                                {"role": "user", "content": second}], sampling)[1]
            exp[side] = (a1, a2)
        expected.append(exp)
    assert len({e["left"][0] for e in expected}) == 3  # the sessions' answers differ: mixing them would show

    mp = pytest.MonkeyPatch()
    counters = [counting(served.models[s].runtime, mp, delay=0.005) for s in ("left", "right")]
    barrier = threading.Barrier(3)

    def session(i):
        client = Client(served.url, verbose=False)
        barrier.wait()
        got = []
        for msg in prompts[i]:
            out = client.predict(msg, n, 0.0, 1.0, 0, api_name="/chat")
            got.append(out)
        return got

    try:
        with ThreadPoolExecutor(3) as ex:
            results = list(ex.map(session, range(3)))
    finally:
        mp.undo()
    for (first, second), exp, (turn1, turn2) in zip(prompts, expected, results):
        for side, pos in (("left", LEFT), ("right", RIGHT)):
            assert answer(turn1[pos]) == exp[side][0]
            assert [text_of(m) for m in turn2[pos]] == [first, exp[side][0], second, exp[side][1]]
    assert max(c.most_active for c in counters) >= 2  # the queue ran sessions at the same time
    assert all(c.active == 0 and c.closed == 6 for c in counters)


def test_stop_ends_the_decode_within_one_step_and_frees_the_cache(served):
    mp = pytest.MonkeyPatch()
    counters = [counting(served.models[s].runtime, mp, delay=0.05) for s in ("left", "right")]
    try:
        job = Client(served.url, verbose=False).submit("hello", 200, 0.0, 1.0, 0, api_name="/chat")
        while sum(c.steps for c in counters) < 8:
            time.sleep(0.01)
        at_cancel = sum(c.steps for c in counters)
        job.cancel()
        deadline = time.time() + 10
        while any(c.closed == 0 for c in counters) and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(0.5)  # ten more steps' worth: none may happen
        after = sum(c.steps for c in counters)
    finally:
        mp.undo()
    assert after - at_cancel <= 1  # only the step already running when Stop arrived
    assert after < 100
    assert all(c.closed == 1 and c.active == 0 for c in counters)  # both decode loops closed: KV caches freed


def test_bad_input_gets_a_note_and_the_demo_keeps_working(served):
    client = Client(served.url, verbose=False)
    out = client.predict("   ", 8, 0.0, 1.0, 0, api_name="/chat")
    assert "Empty message" in out[STATUS] and out[LEFT] == [] and out[RIGHT] == []
    out = client.predict("hello " * 300, 8, 0.0, 1.0, 0, api_name="/chat")
    for pos in (LEFT, RIGHT):
        note = answer(out[pos])
        assert note.startswith("⚠ Not sent to this model") and "context is 256 tokens" in note
    out = client.predict("hello world", 8, 0.0, 1.0, 0, api_name="/chat")  # the long message is not in the history
    rt = served.models["left"].runtime
    assert answer(out[LEFT]) == reference(rt, [{"role": "user", "content": "hello world"}],
                                          SamplingConfig(max_new_tokens=8))[1]
    cleared = client.predict(api_name="/clear")
    assert cleared[0] == [] and cleared[1] == []


def test_a_model_failing_mid_answer_gets_a_note_and_the_other_finishes(served):
    right = served.models["right"].runtime
    orig = right.generate_tokens

    def failing(*args, **kw):
        gen = orig(*args, **kw)
        yield next(gen)
        yield next(gen)
        gen.close()
        raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : boom")

    mp = pytest.MonkeyPatch()
    mp.setattr(right, "generate_tokens", failing)
    try:
        out = Client(served.url, verbose=False).predict("hello world", 16, 0.0, 1.0, 0, api_name="/chat")
    finally:
        mp.undo()
    text = reference(right, [{"role": "user", "content": "hello world"}], SamplingConfig(max_new_tokens=2))[1]
    assert answer(out[RIGHT]) == f"{text}\n\n⚠ This model failed while answering: [ONNXRuntimeError] : 6 : " \
                                 "RUNTIME_EXCEPTION : boom"
    assert "**2** tokens" in out[RIGHT + 2]
    left = served.models["left"].runtime
    assert answer(out[LEFT]) == reference(left, [{"role": "user", "content": "hello world"}],
                                          SamplingConfig(max_new_tokens=16))[1]


def test_a_model_that_fails_to_load_leaves_the_other_working(tiny_pair, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text("{not json")
    left = load_demo_model("left", str(tiny_pair[0]), None, "fp32", threads=1)
    right = load_demo_model("right", str(broken), None, "fp32", threads=1)
    assert left.ok and not right.ok and "unreadable manifest" in right.error
    app = build_app(left, right, concurrency=1)
    launch(app, block=False)
    try:
        out = Client(app.local_url, verbose=False).predict("hello world", 12, 0.0, 1.0, 0, api_name="/chat")
    finally:
        app.close()
    assert answer(out[RIGHT]).startswith("⚠ This model did not load") and "unreadable manifest" in answer(out[RIGHT])
    assert "not loaded" in out[4]
    assert answer(out[LEFT]) == reference(left.runtime, [{"role": "user", "content": "hello world"}],
                                          SamplingConfig(max_new_tokens=12))[1]


def test_profile_button_plots_the_pair(served):
    gallery, table = Client(served.url, verbose=False).predict(api_name="/profile")
    rows = [line for line in table.splitlines() if line.startswith("| left:") or line.startswith("| right:")]
    # the left folder at every P it offers (one line across P in the plots), the right one at its P
    assert [r.split(" | ")[0:3] for r in rows] == [["| left: " + str(served.models["left"].folder), P, "fp32"]
                                                   for P in ("1", "2", "4")] + \
        [["| right: " + str(served.models["right"].folder), "1", "fp32"]]
    from pathlib import Path

    pngs = sorted((Path(item["image"]) for item in gallery), key=lambda p: p.name)
    assert [p.name for p in pngs] == ["profile_decode.png", "profile_memory.png", "profile_ttft.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    # kept in the cache: the next start of the demo for this pair shows the plots at once
    from parscale_edge.demo.app import profile_dir, profile_view

    kept, kept_table = profile_view(profile_dir(served.models))
    assert sorted(Path(p).name for p in kept) == [p.name for p in pngs] and kept_table.split("\n\n")[0] == \
        table.split("\n\n")[0]


def test_turns_go_to_the_model_with_the_least_compute():
    class Fake:
        def __init__(self, cost, steps):
            self.cost, self.left, self.done = cost, steps, False
            self.stats = SimpleNamespace(busy_s=0.0)

        def step(self):
            self.stats.busy_s += self.cost
            self.left -= 1
            self.done = self.left == 0

    fast, slow = Fake(1.0, 12), Fake(3.0, 3)
    order = list(take_turns([fast, None, slow]))
    assert order == [0, 2, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 0, 0]  # 3 fast steps per slow one while both run


@pytest.mark.parametrize("argv,msg", [
    (["demo", "--precision", "int3"], "unknown precision 'int3'"),
    (["demo", "--left-parallel", "0"], "--left-parallel needs positive integers, got '0'"),
    (["demo", "--left-parallel", "2,x"], "--left-parallel takes comma-separated integers"),
    (["demo", "--left", "/nonexistent/a", "--right", "/nonexistent/b"], "neither model loaded"),
])
def test_demo_command_bad_input_is_one_error_line(argv, msg, capsys):
    assert main(["-q", *argv]) == 2
    err = capsys.readouterr().err
    assert f"error: {msg}" in err and "Traceback" not in err


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium executable found (Debian: apt-get install chromium; "
                                              ".ci/run installs it)")
def test_browser_sees_both_panes_stream_and_the_numbers(served, tmp_path):
    from playwright.sync_api import sync_playwright

    mp = pytest.MonkeyPatch()
    counters = [counting(served.models[s].runtime, mp, delay=0.02) for s in ("left", "right")]
    lengths = {"left": [], "right": []}
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                         args=["--no-sandbox", "--disable-background-networking"])
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(served.url)
            box = page.locator("#message textarea")
            box.fill("hello world")
            box.press("Enter")
            deadline = time.time() + 60
            while time.time() < deadline and any(c.closed == 0 for c in counters):
                for s in lengths:
                    bot = page.locator(f"#chat-{s} [data-testid='bot']")
                    lengths[s].append(len(bot.inner_text()) if bot.count() else 0)
                time.sleep(0.05)
            page.wait_for_function("document.querySelector('#stats-right').innerText.includes('tokens')")
            stats = {s: page.locator(f"#stats-{s}").inner_text() for s in lengths}
            final = {s: page.locator(f"#chat-{s} [data-testid='bot']").inner_text() for s in lengths}
            page.screenshot(path=str(tmp_path / "demo.png"), full_page=True)

            # the P control: the next answer uses P=4, and the numbers say so
            page.locator("#P-left").get_by_label("4").check()
            box.fill("hello")
            box.press("Enter")
            deadline = time.time() + 60
            while sum(c.closed for c in counters) < 4 and time.time() < deadline:
                time.sleep(0.05)
            page.wait_for_function("document.querySelector('#stats-left').innerText.includes('P 4 ·')")
            stats_p4 = page.locator("#stats-left").inner_text()

            # a closed tab ends the decode too
            page2 = browser.new_page()
            page2.goto(served.url)
            page2.locator("#message textarea").fill("hello")
            page2.locator("#message textarea").press("Enter")
            before, base = sum(c.closed for c in counters), sum(c.steps for c in counters)
            while sum(c.steps for c in counters) < base + 10:
                time.sleep(0.01)
            page2.close()
            closed_at = sum(c.steps for c in counters)
            deadline = time.time() + 10
            while sum(c.closed for c in counters) < before + 2 and time.time() < deadline:
                time.sleep(0.02)
            after_close = sum(c.steps for c in counters)
            browser.close()
    finally:
        mp.undo()
    for s in lengths:
        grew = distinct(n for n in lengths[s] if n)
        assert len(grew) >= 3 and grew == sorted(grew), (s, grew)  # the text arrived in pieces, growing
        assert len(final[s]) > 0
        assert re.search(r"TTFT \d+ ms · [\d.]+ tok/s · \d+ tokens", stats[s]), stats[s]
        assert re.search(r"resident [\d.]+ MiB · file [\d.]+ MiB", stats[s])
    assert "P 2 · fp32" in stats["left"] and "P 1 · fp32" in stats["right"]
    assert re.search(r"\d+ tokens", stats_p4) and "P 4 · fp32" in stats_p4 and "one backbone serves P = 1, 2, 4" in stats_p4
    assert counters[0].parallel[:2] == [2, 4]  # what the left model was asked for: start P, then the chosen one
    assert (tmp_path / "demo.png").read_bytes()[:4] == b"\x89PNG"
    assert sum(c.closed for c in counters) == before + 2  # the closed tab's answers were closed (caches freed)
    assert after_close - closed_at <= 3 and after_close < base + 2 * 64  # 64 = max new tokens: it stopped early
