"""The Gradio app: one input, two chat panes streaming at the same time, numbers under each pane.

Design (issue #6):
- One event handler, :func:`respond`, a plain generator: it builds one :class:`parscale_edge.demo.streaming.Answer`
  per loaded model and advances them in turns (:func:`parscale_edge.demo.streaming.take_turns`: the model with
  the least compute so far goes next), yielding the panes after every decode step. No thread of
  our own: Gradio runs each ``next()`` in its worker pool. Stop (``cancels=``), a closed tab and
  Clear end the event; Gradio then closes the generator, ``GeneratorExit`` arrives at the yield
  after the step in progress, and ``finally`` closes both answers (frees their KV caches). So a
  stop costs at most the one decode step already running.
- The queue's concurrency is explicit (``concurrency``: that many answers decode at once, more
  wait in the queue); each browser session's history lives in its own ``gr.State``.
- P per answer: a model whose fused export offers several P over one backbone gets a P control;
  the P selected when a message is sent goes with that request (``generate_tokens(parallel=P)``),
  so sessions with different P decode side by side on one ONNX Runtime session. The numbers under
  a pane show the P of the answer they measure.
- Bad input never raises: an empty message gets a note under the input; a conversation longer
  than a model's context, or a model that did not load, gets a note in that model's pane and the
  other pane answers as usual.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import gradio as gr

from .models import DemoModel, adapter_verdict
from .streaming import Answer, AnswerStats, take_turns

SIDES = ("left", "right")
EXAMPLES = [
    "Write a Python function that reverses a string.",
    "What is the difference between a list and a tuple in Python?",
    "Explain recursion in two sentences.",
    "def fibonacci(n):",
]
NOTE = "⚠ "


def new_session() -> dict:
    """Per-session state: each side's model history (what the model sees) and its pane (what the
    person sees: the history plus notes)."""
    return {"history": {s: [] for s in SIDES}, "display": {s: [] for s in SIDES}}


def pane_message(role: str, text: str) -> dict:
    """A chat pane entry. The text goes in a text part: gradio would ``inspect.cleandoc`` a plain
    string (strip and dedent it), which changes code and whitespace the model wrote."""
    return {"role": role, "content": {"type": "text", "text": text}}


def _list(xs) -> str:
    return ", ".join(map(str, xs))


def header_md(lm: DemoModel) -> str:
    """The line above a pane: which model, P (or the P it offers), precision (or that it did not load)."""
    if not lm.ok:
        return f"### {lm.label}: {lm.spec}\nnot loaded"
    if len(lm.parallel_choices) > 1:
        kind = f"ParScale, one backbone for P = {_list(lm.parallel_choices)}"
    else:
        kind = f"ParScale, P={lm.P} streams" if lm.P > 1 else "dense (P=1)"
    head = f"### {lm.label}: {lm.spec}\n{kind} · {lm.precision} · `{lm.folder.name}`"
    verdict = adapter_verdict() if lm.adapters else None
    return head + (f"  \n<small>{verdict} (README: Does ParScale help, or is it prefix tuning?)</small>"
                   if verdict else "")


def _mib(x: float) -> str:
    return f"{x:.0f}" if abs(x) >= 10 else f"{x:.1f}"


def stats_md(lm: DemoModel, st: AnswerStats | None, P: int | None = None) -> str:
    """The numbers under a pane: TTFT (ms), decode tokens/s, tokens generated, KV cache of the
    answer (MiB), then P, precision, resident memory (MiB, how measured), file size (MiB). P is the
    one the answer ``st`` used; before the first answer (``st`` None) the selected ``P`` (default
    the model's start P). A model offering several P adds what its ParScale parts cost."""
    if not lm.ok:
        return f"{NOTE}not loaded: {lm.error}"
    P = st.P if st is not None else (P if P is not None else lm.P)
    fixed = (f"P **{P}** · {lm.precision} · resident **{_mib(lm.resident_mib)}** MiB · file "
             f"**{_mib(lm.file_mib)}** MiB")
    if len(lm.parallel_choices) > 1:
        fixed += (f"  \none backbone serves P = {_list(lm.parallel_choices)}; the ParScale parts of all of them "
                  f"(prefixes, aggregators) are **{_mib(lm.parts_mib)}** MiB of that")
    if st is None:
        live = "TTFT – · tok/s – · tokens –"
    else:
        ttft = f"**{st.ttft_ms:.0f}** ms" if st.ttft_ms is not None else "–"
        tps = f"**{st.tokens_per_s:.1f}**" if st.tokens_per_s is not None else "–"
        live = f"TTFT {ttft} · {tps} tok/s · **{st.tokens}** tokens · KV cache {_mib(st.kv_bytes / 2**20)} MiB"
    return f"{live}  \n{fixed}  \n<small>resident = {lm.resident_how}; timings count this model's own steps</small>"


def _sampling(max_new_tokens, temperature, top_p, seed):
    from parscale_edge.runtime import SamplingConfig

    t = float(temperature or 0.0)
    return SamplingConfig(max_new_tokens=int(max_new_tokens), do_sample=t > 0, temperature=t,
                          top_p=float(top_p if top_p is not None else 1.0),
                          seed=None if seed is None or seed == "" else int(seed))


def make_respond(models: dict[str, DemoModel]):
    """The submit handler over ``models`` (``{"left": ..., "right": ...}``): a generator yielding
    (textbox, left pane, right pane, left numbers, right numbers, status, session state).
    ``left_P`` / ``right_P``: the P each model answers with (None: its start P); a P a model does
    not offer gets a note in its pane."""

    def respond(message: str, max_new_tokens: int, temperature: float, top_p: float, seed, left_P, right_P,
                session: dict | None):
        session = session if session else new_session()
        hist, disp = session["history"], session["display"]
        stats: dict[str, AnswerStats | None] = {s: None for s in SIDES}
        chosen = {s: (int(P) if P not in (None, "") else None) for s, P in (("left", left_P), ("right", right_P))}

        def out(box, status=""):
            return (box, disp["left"], disp["right"], stats_md(models["left"], stats["left"], chosen["left"]),
                    stats_md(models["right"], stats["right"], chosen["right"]), status, session)

        if not message or not message.strip():
            yield out(message or "", f"{NOTE}Empty message: type a question first.")
            return
        try:
            sampling = _sampling(max_new_tokens, temperature, top_p, seed)
        except (TypeError, ValueError) as e:
            yield out(message, f"{NOTE}{e}")
            return
        answers: list[Answer | None] = []
        for s in SIDES:
            lm, answer = models[s], None
            disp[s].append(pane_message("user", message))
            if not lm.ok:
                disp[s].append(pane_message("assistant", f"{NOTE}This model did not load: {lm.error}"))
            else:
                try:
                    P = chosen[s] if chosen[s] is not None else lm.P
                    answer = Answer(lm.runtime, hist[s] + [{"role": "user", "content": message}], sampling, P)
                except ValueError as e:  # PromptTooLong, a P not offered, a chat template that rejects the messages
                    disp[s].append(pane_message("assistant", f"{NOTE}Not sent to this model: {str(e).rstrip('.')}."))
                else:
                    hist[s] += [{"role": "user", "content": message}, {"role": "assistant", "content": ""}]
                    disp[s].append(pane_message("assistant", ""))
                    stats[s] = answer.stats
            answers.append(answer)
        try:
            yield out("")
            for i in take_turns(answers):
                s, a = SIDES[i], answers[i]
                hist[s][-1]["content"] = a.text
                shown = a.text if (a.text or not a.done) else "(empty answer: the model stopped at once)"
                if a.error:
                    shown = f"{a.text}\n\n{NOTE}This model failed while answering: {a.error}".strip()
                disp[s][-1]["content"]["text"] = shown
                yield out("")
        finally:
            for a in answers:
                if a is not None:
                    a.close()

    return respond


# ------------------------------------------------------------------------------------------ profile
def profile_dir(models: dict[str, DemoModel]) -> Path | None:
    """``<cache>/demo-profile/<left folder>--<right folder>-<hash of both paths>``; None unless both loaded."""
    from parscale_edge.hub import default_cache_dir

    if not all(m.ok for m in models.values()):
        return None
    l, r = models["left"].folder.resolve(), models["right"].folder.resolve()
    digest = hashlib.sha256(f"{l}|{r}".encode()).hexdigest()[:10]
    return Path(default_cache_dir()) / "demo-profile" / f"{l.name}--{r.name}-{digest}"


def profile_view(folder: Path | None) -> tuple[list[str], str]:
    """(PNG paths, Markdown table) of the pair's profile in ``folder``, or ([], a hint) when none."""
    if folder is None:
        return [], "Profiling needs both models loaded."
    if not (folder / "profile.json").exists():
        return [], ("No profile of this pair yet. **Profile this pair** runs the profiler (`parscale_edge.profile`: each model "
                    "at each P it offers in its own process, batch 1, 32-token prompt, 32 new tokens) and plots decode "
                    "time, memory and TTFT against P.")
    rows = json.loads((folder / "profile.json").read_text())["rows"]
    lines = ["| model | P | precision | TTFT ms | decode ms/step p50 | decode tok/s | peak RSS MiB | file MiB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['P']} | {r['precision']} | {r['ttft_ms']:.0f} | {r['decode_ms_p50']:.1f} | "
                     f"{r['decode_tokens_per_s']:.1f} | {r['peak_rss_mib']:.0f} | {r['file_mib']:.0f} |")
    pngs = sorted(str(p) for p in folder.glob("*.png"))
    return pngs, "\n".join(lines) + f"\n\n<small>{folder}</small>"


def run_profile(models: dict[str, DemoModel], threads: int | None, gen_len: int = 32) -> Path:
    """Profile both loaded folders at every P they offer (fresh worker process each, batch 1, prompt
    32, ``gen_len`` new tokens, 2 repeats) and write ``profile.json`` + the profiler's PNGs into :func:`profile_dir`
    (atomically). Raises RuntimeError when a worker fails."""
    from parscale_edge.atomic import atomic_folder, write_json
    from parscale_edge.plots import plot_profile
    from parscale_edge.profile import profile_folder

    out = profile_dir(models)
    rows = []
    for s in SIDES:
        lm = models[s]
        for P in lm.parallel_choices:  # a folder offering several P: one line across them
            for r in profile_folder(lm.folder, [1], [32], gen_len, threads=threads, repeat=2, warmup=1, parallel=P):
                rows.append({"model": f"{s}: {lm.spec}", "kind": "parscale", **r, "folder": str(lm.folder)})
    with atomic_folder(out, overwrite=True) as tmp:
        write_json(tmp / "profile.json", {"rows": rows, "settings": {"batch": 1, "prompt_len": 32, "gen_len": gen_len,
                                                                     "repeat": 2, "warmup": 1, "threads": threads}})
        plot_profile(rows, tmp, f"{models['left'].spec} vs {models['right'].spec} on this device")
    return out


# ---------------------------------------------------------------------------------------------- app
THEME_FONTS = dict(font=["ui-sans-serif", "system-ui", "sans-serif"],
                   font_mono=["ui-monospace", "monospace"])  # no web fonts: the device may be offline


def build_app(left: DemoModel, right: DemoModel, *, concurrency: int = 2, max_new_tokens: int = 256,
              threads: int | None = None) -> gr.Blocks:
    """The demo's Blocks for two loaded (or failed) models.

    ``concurrency``: answers decoded at once across all sessions (the queue's limit for the chat
    event; more requests wait). ``max_new_tokens``: the slider's initial value. ``threads``: ONNX
    Runtime threads of the profile button's worker processes. API names: ``/chat`` (streams;
    message, max new tokens, temperature, top-p, seed, left P, right P), ``/clear``, ``/profile``."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    models = {"left": left, "right": right}
    with gr.Blocks(title="parscale-edge: ParScale beside a larger dense model", analytics_enabled=False) as app:
        gr.Markdown("## ParScale beside a larger dense model, on this device\n"
                    "One message goes to both models; each answer streams in its own pane. The two models take "
                    "turns on the CPU (each gets half), so the numbers under a pane count that model's own work.")
        state = gr.State(new_session())
        panes, numbers, P_of = {}, {}, {}
        with gr.Row(equal_height=True):
            for s, lm in models.items():
                with gr.Column():
                    with gr.Row(equal_height=True):
                        gr.Markdown(header_md(lm), elem_id=f"header-{s}")
                        # P control: shown where the model offers several P over one backbone; each answer
                        # uses the P selected when it is sent (per session: two sessions may differ). Hidden
                        # with one P, so the API keeps its parameters; a model that did not load has none.
                        if lm.ok:
                            P_of[s] = gr.Radio(lm.parallel_choices, value=lm.P, label="P (streams)",
                                               visible=len(lm.parallel_choices) > 1, elem_id=f"P-{s}", scale=0,
                                               min_width=220)
                        else:
                            P_of[s] = gr.State(None)
                    panes[s] = gr.Chatbot(label=f"{s}: {lm.spec}", show_label=False, height=420, elem_id=f"chat-{s}",
                                          placeholder=None if lm.ok else f"{NOTE}This model did not load: {lm.error}",
                                          buttons=["copy"])
                    numbers[s] = gr.Markdown(stats_md(lm, None), elem_id=f"stats-{s}")
        with gr.Row():
            msg = gr.Textbox(placeholder="Ask both models...", show_label=False, scale=8, lines=1, max_lines=8,
                             elem_id="message", submit_btn=False)
            send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
            stop = gr.Button("Stop", variant="stop", scale=1, elem_id="stop")
            clear = gr.Button("Clear chat", scale=1, elem_id="clear")
        status = gr.Markdown("", elem_id="status")
        with gr.Accordion("Generation settings", open=False):
            with gr.Row():
                max_new = gr.Slider(1, 2048, value=max_new_tokens, step=1, label="max new tokens")
                temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="temperature (0 = greedy)")
                top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="top-p")
                seed = gr.Number(value=0, precision=0, label="seed (sampling)")
        gr.Examples(EXAMPLES, inputs=[msg], label="Examples")
        pdir = profile_dir(models)
        pngs, table = profile_view(pdir)
        with gr.Accordion("Profile of this pair (the profiler's plots)", open=False):
            gallery = gr.Gallery(value=pngs, columns=3, height=300, label="decode ms/step, memory, TTFT against P",
                                 elem_id="profile-plots")
            ptable = gr.Markdown(table, elem_id="profile-table")
            pbtn = gr.Button("Profile this pair (a minute or two)", interactive=pdir is not None, elem_id="profile")

        respond = make_respond(models)
        io = dict(inputs=[msg, max_new, temperature, top_p, seed, P_of["left"], P_of["right"], state],
                  outputs=[msg, panes["left"], panes["right"], numbers["left"], numbers["right"], status, state],
                  concurrency_limit=concurrency, concurrency_id="decode", show_progress="hidden")
        # one event for Enter and Send, so a session never runs two answers at once (trigger_mode "once")
        ev = gr.on([msg.submit, send.click], respond, api_name="chat", trigger_mode="once", **io)
        stop.click(None, None, None, cancels=[ev], api_visibility="private")

        def clear_chat(left_P=None, right_P=None):
            return ([], [], stats_md(left, None, left_P), stats_md(right, None, right_P), "", new_session())

        def clear_side(side: str):
            def fn(P, session: dict | None):  # a pane's own trash button: forget that side's conversation only
                session = session if session else new_session()
                session["history"][side], session["display"][side] = [], []
                return stats_md(models[side], None, P), session
            return fn

        for s in SIDES:
            panes[s].clear(clear_side(s), [P_of[s], state], [numbers[s], state], api_visibility="private")

        clear.click(clear_chat, [P_of["left"], P_of["right"]],
                    [panes["left"], panes["right"], numbers["left"], numbers["right"], status, state],
                    cancels=[ev], api_name="clear")

        def profile_pair():
            try:
                return (*profile_view(run_profile(models, threads)),)
            except Exception as e:  # noqa: BLE001 - shown in the panel, the demo keeps running
                return profile_view(pdir)[0], f"{NOTE}profiling failed: {' '.join(str(e).split())[:500]}"

        pbtn.click(profile_pair, None, [gallery, ptable], concurrency_limit=1, concurrency_id="profile",
                   api_name="profile")
    app.queue(default_concurrency_limit=concurrency, max_size=64)
    app.demo_profile_root = pdir.parent if pdir is not None else None  # for launch(allowed_paths=...)
    return app


def launch(app: gr.Blocks, host: str = "127.0.0.1", port: int | None = None, share: bool = False,
           block: bool = True):
    """Serve ``app`` (no share link unless ``share``; no web fonts, no analytics). With ``block``
    False returns at once (tests): ``app.local_url`` has the address; ``app.close()`` stops it."""
    allowed = [str(app.demo_profile_root)] if getattr(app, "demo_profile_root", None) else None
    return app.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=not block,
                      quiet=not block, allowed_paths=allowed, ssr_mode=False, footer_links=["api", "settings"],
                      theme=gr.themes.Default(**THEME_FONTS))
