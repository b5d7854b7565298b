"""parscale_edge.tokenizer: save/load, eos ids, chat templates, streaming detokenisation (offline, fast)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from parscale_edge.gguf_io import read_gguf_tokenizer
from parscale_edge.tokenizer import CHATML_TEMPLATE, StreamDecoder, Tokenizer
from tiny_gguf import write_tiny_gguf

MULTIBYTE = "naïve café → 你好，世界！🙂 emoji 👍🏽 and 🇫🇷 flags; Ω≈ç√ 日本語テキスト 🙂🙂"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    p = tmp_path_factory.mktemp("tok") / "tiny.gguf"
    write_tiny_gguf(p, "qwen2")
    return read_gguf_tokenizer(p)


def test_imports_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import parscale_edge.tokenizer, parscale_edge.gguf_io, parscale_edge.hub\n"
            "assert 'transformers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_save_and_from_dir_roundtrip(tok, tmp_path):
    tok.save(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg["eos_token"] == "<|im_end|>" and cfg["bos_token"] == "<|im_start|>"
    assert cfg["eos_token_ids"] == [2, 0] and "chat_template" in cfg
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    t2 = Tokenizer.from_dir(tmp_path)
    for text in [MULTIBYTE, "<|im_start|>user\nhello world<|im_end|>\n", "x 12 <tool_call>"]:
        assert t2.encode(text) == tok.encode(text)
        assert t2.decode(t2.encode(text)) == text
    assert t2.eos_token_ids == tok.eos_token_ids
    assert t2.chat_template == tok.chat_template
    assert (t2.bos_token_id, t2.eos_token_id, t2.pad_token_id, t2.vocab_size) == \
        (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.vocab_size)


def test_from_dir_hf_conventions(tok, tmp_path):
    """AddedToken dicts for special tokens, named template lists, chat_template.jinja, extra eos ids."""
    tok.hf.save(str(tmp_path / "tokenizer.json"))
    cfg = {"bos_token": None, "eos_token": {"content": "<|endoftext|>", "special": True},
           "chat_template": [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "{{ bos_token }}D"}],
           "eos_token_ids": [5]}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    t = Tokenizer.from_dir(tmp_path)
    assert t.eos_token == "<|endoftext|>" and t.bos_token is None
    assert t.eos_token_ids == [0, 5, 2]  # eos, configured extras, then <|im_end|> found in the vocab
    assert t.apply_chat_template([]) == "D"
    del cfg["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    (tmp_path / "chat_template.jinja").write_text("J{{ messages|length }}")
    assert Tokenizer.from_dir(tmp_path).apply_chat_template([{"role": "user", "content": "x"}]) == "J1"


def test_from_dir_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_unknown_special_token_rejected(tok):
    with pytest.raises(ValueError, match="not in the tokenizer's vocabulary"):
        Tokenizer(tok.hf, eos_token="</s>")


def test_chatml_fallback_without_template(tok):
    t = Tokenizer(tok.hf, eos_token="<|im_end|>", chat_template=None)
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}]
    assert t.apply_chat_template(msgs) == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert t.apply_chat_template(msgs, add_generation_prompt=False).endswith("hi<|im_end|>\n")
    assert t.chat_template is None and CHATML_TEMPLATE


def test_template_features(tok):
    """trim_blocks/lstrip_blocks, tojson keeps non-ASCII, bos/eos variables, extra context, sandbox."""
    tpl = ("{{ bos_token }}\n{% for m in messages %}\n    {{ m['content'] | tojson }}\n{% endfor %}\n"
           "{% if tools %}{{ tools | length }}{% endif %}{{ eos_token }}")
    t = Tokenizer(tok.hf, bos_token="<|im_start|>", eos_token="<|im_end|>", chat_template=tpl)
    out = t.apply_chat_template([{"role": "user", "content": "é"}], tools=[{"name": "f"}])
    assert out == '<|im_start|>\n    "é"\n1<|im_end|>'
    bad = Tokenizer(tok.hf, chat_template="{{ messages.__class__.__mro__ }}")
    with pytest.raises(ValueError, match="unsafe"):
        bad.apply_chat_template([])
    with pytest.raises(ValueError, match="not valid Jinja"):
        Tokenizer(tok.hf, chat_template="{% for %}").apply_chat_template([])


def test_generation_tag_renders_body(tok):
    t = Tokenizer(tok.hf, chat_template="{% generation %}A{{ messages|length }}{% endgeneration %}B")
    assert t.apply_chat_template([{}]) == "A1B"


# --------------------------------------------------------------------------------- streaming
def _stream(tok, ids, **kw):
    dec = StreamDecoder(tok, **kw)
    pieces = [dec.put(i) for i in ids]
    pieces.append(dec.flush())
    return pieces


def test_stream_multibyte_exact(tok):
    ids = tok.encode(MULTIBYTE)
    # the tiny vocabulary has no merges for these characters: they really are split byte-wise
    assert len(ids) > len(MULTIBYTE) + 40
    pieces = _stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids) == MULTIBYTE
    assert not any("\ufffd" in p for p in pieces)
    # held back while incomplete, released as soon as complete: '🙂' is 4 byte-level pieces (3 tokens)
    smile = tok.encode("🙂")
    assert len(smile) == 3
    assert _stream(tok, smile) == ["", "", "🙂", ""]


def test_stream_special_tokens(tok):
    ids = tok.encode("<|im_start|>assistant\n你好<|im_end|>")
    assert "".join(_stream(tok, ids)) == tok.decode(ids)
    assert "".join(_stream(tok, ids, skip_special_tokens=True)) == "assistant\n你好"


def test_stream_flush_incomplete_and_reset(tok):
    ids = tok.encode("a🙂")
    dec = StreamDecoder(tok)
    assert dec.put(ids[0]) == "a"
    assert dec.put(ids[1]) == ""
    assert dec.flush() == "\ufffd"  # what decode() gives for the dangling bytes
    assert dec.put(tok.encode("b")[0]) == "b"  # flush reset the state


def test_stream_window_stays_small(tok):
    dec = StreamDecoder(tok)
    ids = tok.encode("hello world " * 200)
    out = "".join(dec.put(i) for i in ids) + dec.flush()
    assert out == "hello world " * 200
    dec2 = StreamDecoder(tok)
    for i in ids:
        dec2.put(i)
        assert len(dec2._ids) <= 4  # only the prefix window is kept, not the history
