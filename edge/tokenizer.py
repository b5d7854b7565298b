"""Tokenizer, chat template and streaming detokenizer (no torch, no transformers).

:class:`Tokenizer` wraps a Hugging Face ``tokenizers.Tokenizer`` (the Rust fast tokenizer) together
with the few ``tokenizer_config.json`` settings generation needs: the special tokens, the list of
token ids that end a generation, and the Jinja chat template. It reads and writes the usual Hugging
Face pair of files (``tokenizer.json`` + ``tokenizer_config.json``), so a folder it writes loads in
``transformers.AutoTokenizer`` as a ``PreTrainedTokenizerFast``, and it reads folders written by
transformers. :func:`parscale_edge.gguf_io.read_gguf_tokenizer` builds one from a GGUF file's metadata.

:class:`StreamDecoder` turns a stream of token ids into text one token at a time without ever
emitting half of a multi-byte UTF-8 character (byte-level BPE splits emoji and CJK characters
across tokens).

All token ids are Python ``int``; all text is ``str``.
"""
from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Sequence

from tokenizers import Tokenizer as HFTokenizer

from .manifest import MANIFEST_FILE, REEXPORT_HINT, ExportFolderError, Manifest

__all__ = ["Tokenizer", "StreamDecoder", "CHATML_TEMPLATE", "END_OF_TURN_TOKENS", "render_chat_template"]

#: Tokens that end an assistant turn in common chat formats. A chat model must stop on them as
#: well as on its eos token, or it goes on to invent the next user turn (docs/parscale.md, "End-of-turn tokens").
END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end|>")

#: Fallback template (ChatML, the format of Qwen2 and SmolLM2) for tokenizers without one; this is
#: the same template transformers used as its legacy default.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _token_content(tok: Any) -> str | None:
    """A special token from tokenizer_config.json: a string, an AddedToken dict, or null."""
    if tok is None:
        return None
    if isinstance(tok, dict):
        return tok.get("content")
    return str(tok)


def _pick_template(tpl: Any) -> str | None:
    """``chat_template`` may be a string or a list of ``{"name", "template"}`` (named templates)."""
    if tpl is None or isinstance(tpl, str):
        return tpl
    if isinstance(tpl, list):
        named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
        return named.get("default") or next(iter(named.values()), None)
    raise ValueError(f"chat_template must be a string or a list of named templates, got {type(tpl).__name__}")


# ------------------------------------------------------------------------------- chat templates
_TEMPLATE_CACHE: dict[str, Any] = {}


def _compile_template(source: str):
    """Compile a chat template like transformers does: a sandboxed immutable Jinja environment with
    ``trim_blocks``/``lstrip_blocks``, the ``loopcontrols`` extension, a ``tojson`` filter that
    keeps non-ASCII characters, and the ``raise_exception`` and ``strftime_now`` globals.
    ``{% generation %}`` blocks (used by transformers to mark assistant tokens) render as their body.
    """
    cached = _TEMPLATE_CACHE.get(source)
    if cached is not None:
        return cached
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _GenerationBlock(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_render", []), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationBlock, "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        compiled = env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ValueError(f"the chat template is not valid Jinja (line {e.lineno}): {e.message}") from None
    _TEMPLATE_CACHE[source] = compiled
    return compiled


def render_chat_template(template: str, messages: Sequence[dict], add_generation_prompt: bool = True,
                         **context: Any) -> str:
    """Render a Hugging Face chat template (a Jinja string) for ``messages``.

    Args:
        template: the Jinja source.
        messages: ``[{"role": "system"|"user"|"assistant", "content": str}, ...]``.
        add_generation_prompt: append the header that starts the assistant's answer.
        **context: further template variables (``bos_token``, ``eos_token``, ``tools`` ...).

    Raises:
        ValueError: the template is not valid Jinja, or it called ``raise_exception`` (e.g. because
            the roles do not alternate); the message is the template's own.
    """
    import jinja2

    compiled = _compile_template(template)
    try:
        return compiled.render(messages=list(messages), add_generation_prompt=add_generation_prompt, **context)
    except jinja2.exceptions.TemplateError as e:
        raise ValueError(f"chat template error: {e}") from None


# ------------------------------------------------------------------------------------ Tokenizer
class Tokenizer:
    """A fast tokenizer plus the special-token and chat-template settings generation needs.

    Attributes:
        hf: the wrapped ``tokenizers.Tokenizer``.
        chat_template: Jinja source, or None when the tokenizer has none (then
            :meth:`apply_chat_template` falls back to ChatML).
        bos_token, eos_token, pad_token, unk_token: token strings or None.
        config: the ``tokenizer_config.json`` dict this was built from (kept for :meth:`save`).
    """

    def __init__(self, hf_tokenizer: HFTokenizer, *, bos_token: str | None = None,
                 eos_token: str | None = None, pad_token: str | None = None, unk_token: str | None = None,
                 chat_template: str | None = None, eos_token_ids: Iterable[int] = (),
                 config: dict[str, Any] | None = None) -> None:
        """Wrap ``hf_tokenizer``. ``eos_token_ids`` adds stop ids beyond the eos token and the
        end-of-turn tokens of :data:`END_OF_TURN_TOKENS` (which are always added when in the vocab).

        Raises:
            ValueError: a given special token is not in the vocabulary.
        """
        self.hf = hf_tokenizer
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token
        for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
            tok = getattr(self, name)
            if tok is not None and self.hf.token_to_id(tok) is None:
                raise ValueError(f"{name} {tok!r} is not in the tokenizer's vocabulary")
        self.chat_template = chat_template
        self._extra_eos = [int(i) for i in eos_token_ids]
        self.config = dict(config or {})

    # ----------------------------------------------------------------------------- loading/saving
    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load ``tokenizer.json`` and (optional) ``tokenizer_config.json`` from a folder.

        Reads the Hugging Face keys ``bos_token``, ``eos_token``, ``pad_token``, ``unk_token``
        (strings or AddedToken dicts), ``chat_template`` (string or list of named templates; a
        ``chat_template.jinja`` file, as newer transformers write, is used when the key is absent)
        and our extra key ``eos_token_ids`` (list of int). In an export folder (``manifest.json``
        present) the tokenizer must belong to the model (:func:`check_tokenizer`).

        Raises:
            FileNotFoundError: no ``tokenizer.json`` in ``path``.
            ValueError: a file is not valid JSON, or a special token is not in the vocabulary.
            parscale_edge.manifest.ExportFolderError (a ValueError): the tokenizer of an export folder has
                another model's vocabulary size.
        """
        d = Path(path)
        tj = d / "tokenizer.json"
        if not tj.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {d} (a Hugging Face fast tokenizer is required)")
        try:
            hf = HFTokenizer.from_file(str(tj))
        except Exception as e:  # tokenizers raises a generic Exception on malformed JSON
            raise ValueError(f"{tj} is not a valid tokenizers JSON file: {e}") from None
        cfg: dict[str, Any] = {}
        cj = d / "tokenizer_config.json"
        if cj.is_file():
            try:
                cfg = json.loads(cj.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise ValueError(f"{cj} is not valid JSON: {e}") from None
        template = _pick_template(cfg.get("chat_template"))
        jf = d / "chat_template.jinja"
        if template is None and jf.is_file():
            template = jf.read_text(encoding="utf-8")
        eos_ids = cfg.get("eos_token_ids") or []
        if isinstance(eos_ids, int):
            eos_ids = [eos_ids]
        tok = cls(hf, bos_token=_token_content(cfg.get("bos_token")), eos_token=_token_content(cfg.get("eos_token")),
                  pad_token=_token_content(cfg.get("pad_token")), unk_token=_token_content(cfg.get("unk_token")),
                  chat_template=template, eos_token_ids=eos_ids, config=cfg)
        if (d / MANIFEST_FILE).is_file():
            check_tokenizer(tok.vocab_size, d, Manifest.read(d))
        return tok

    def save(self, path: str | os.PathLike) -> None:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` into folder ``path`` (created if
        needed). The config keeps unknown keys it was loaded with, sets ``tokenizer_class`` to
        ``PreTrainedTokenizerFast`` and stores ``eos_token_ids`` (the full stop list)."""
        d = Path(path)
        d.mkdir(parents=True, exist_ok=True)
        self.hf.save(str(d / "tokenizer.json"))
        cfg = dict(self.config)
        cfg.pop("added_tokens_decoder", None)  # may be stale; tokenizer.json is the source of truth
        cfg.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        cfg.setdefault("clean_up_tokenization_spaces", False)
        for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
            cfg[name] = getattr(self, name)
        cfg["eos_token_ids"] = self.eos_token_ids
        if self.chat_template is not None:
            cfg["chat_template"] = self.chat_template
        else:
            cfg.pop("chat_template", None)
        (d / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n",
                                                 encoding="utf-8")

    # ------------------------------------------------------------------------------- vocabulary
    def token_to_id(self, token: str) -> int | None:
        """Id of a token string, or None when it is not in the vocabulary."""
        return self.hf.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """Token string of an id (byte-level form, e.g. ``'Ġworld'``), or None when out of range."""
        return self.hf.id_to_token(int(token_id))

    def _id(self, tok: str | None) -> int | None:
        return None if tok is None else self.hf.token_to_id(tok)

    @property
    def bos_token_id(self) -> int | None:
        """Id of ``bos_token`` or None."""
        return self._id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        """Id of ``eos_token`` or None."""
        return self._id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        """Id of ``pad_token`` or None."""
        return self._id(self.pad_token)

    @property
    def eos_token_ids(self) -> list[int]:
        """Every id that ends a generation: the eos token, the configured ``eos_token_ids``, and the
        end-of-turn tokens of :data:`END_OF_TURN_TOKENS` present in the vocabulary, in that order,
        without duplicates."""
        out: list[int] = []
        cands = [self.eos_token_id, *self._extra_eos, *(self.hf.token_to_id(t) for t in END_OF_TURN_TOKENS)]
        for i in cands:
            if i is not None and i not in out:
                out.append(int(i))
        return out

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (may be smaller than the model's embedding
        rows, which are often padded)."""
        return self.hf.get_vocab_size(with_added_tokens=True)

    # ------------------------------------------------------------------------ encode / decode
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``. Special tokens written in the text (``<|im_start|>``) become their
        single ids. ``add_special_tokens=True`` applies the tokenizer's post-processor (e.g. a bos
        token for models configured with one); the default adds nothing, which is what a rendered
        chat template wants.

        Raises ValueError for text with lone surrogates (U+D800..U+DFFF: not Unicode text, e.g.
        undecodable bytes read with Python's ``surrogateescape``)."""
        try:
            return self.hf.encode(text, add_special_tokens=add_special_tokens).ids
        except TypeError:
            if isinstance(text, str):
                bad = next((i for i, c in enumerate(text) if "\ud800" <= c <= "\udfff"), None)
                if bad is not None:
                    raise ValueError(
                        f"the text has a lone surrogate U+{ord(text[bad]):04X} at character {bad}: it is not valid "
                        "Unicode (often bytes that are not UTF-8); pass UTF-8 text") from None
            raise

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` (a list of int or a 1-D integer array). Bytes that do not form valid
        UTF-8 decode to U+FFFD. Raises OverflowError/TypeError for negative or non-integer ids."""
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------------ chat template
    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True,
                            **context: Any) -> str:
        """Render ``messages`` (``[{"role": ..., "content": ...}]``) to the prompt string.

        Uses the tokenizer's own Jinja template, rendered as transformers renders it (sandboxed,
        ``trim_blocks``/``lstrip_blocks``, ``raise_exception``; ``bos_token``/``eos_token``/
        ``pad_token``/``unk_token`` are template variables). **Without a template it falls back to
        ChatML** (:data:`CHATML_TEMPLATE`), the format of Qwen2 and SmolLM2. Encode the result with
        ``encode(text)`` (no extra special tokens: the template already wrote them).

        Raises:
            ValueError: the template is invalid or rejected the messages (``raise_exception``).
        """
        template = self.chat_template or CHATML_TEMPLATE
        ctx = {"bos_token": self.bos_token or "", "eos_token": self.eos_token or "",
               "pad_token": self.pad_token or "", "unk_token": self.unk_token or ""}
        ctx.update(context)
        return render_chat_template(template, messages, add_generation_prompt, **ctx)

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r}, "
                f"eos_token_ids={self.eos_token_ids}, chat_template={'yes' if self.chat_template else 'no (ChatML)'})")


# ------------------------------------------------------------------------------ StreamDecoder
class StreamDecoder:
    """Incremental detokenizer: feed ids one by one, get text as soon as it is complete.

    Uses the prefix/read offset scheme of Hugging Face's TextStreamer and vLLM: each step decodes
    only the window ``ids[prefix_offset:]`` and the already-emitted part ``ids[prefix_offset:
    read_offset]`` and returns the difference, so a step costs O(window), not O(history), and
    decoders that depend on context (leading-space handling) still see the previous token. Text
    whose decoding ends in U+FFFD (an incomplete UTF-8 sequence split across byte-level tokens) is
    held back until the character completes. The concatenation of every ``put`` and the final
    ``flush`` equals ``tokenizer.decode(all_ids)`` for byte-level BPE tokenizers.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def put(self, token_id: int) -> str:
        """Add one token id; return the newly completed text ('' while a character is incomplete)."""
        self._ids.append(int(token_id))
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            delta = new_text[len(prefix_text):]
            # Drop ids before the new prefix window so memory stays O(window) on long generations.
            keep_from = self._read_offset
            self._ids = self._ids[keep_from:]
            self._prefix_offset = 0
            self._read_offset = len(self._ids)
            return delta
        return ""

    def flush(self) -> str:
        """Return whatever is still held back (an incomplete character decodes to U+FFFD) and reset."""
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset:])
        self.reset()
        return new_text[len(prefix_text):]

    def reset(self) -> None:
        """Forget all state (start a new stream)."""
        self._ids = []
        self._prefix_offset = 0
        self._read_offset = 0


def check_tokenizer(tokenizer_vocab_size: int, folder: str | os.PathLike, manifest: Manifest) -> None:
    """A tokenizer loaded from an export folder belongs to the model.

    Its vocabulary (added tokens included) must fit in the model's embedding rows (models often pad
    them, so fewer tokens is fine) and, when the exporter recorded it, equal the exported
    tokenizer's size. Raises ExportFolderError naming tokenizer.json and the fix."""
    f = Path(folder) / "tokenizer.json"
    fix = f"copy the tokenizer.json exported with this model into {folder}, or {REEXPORT_HINT}"
    if tokenizer_vocab_size > manifest.vocab_size:
        raise ExportFolderError(f"{f} has {tokenizer_vocab_size} tokens but the model has only {manifest.vocab_size} "
                                f"embedding rows: the tokenizer belongs to another model; {fix}")
    rec = manifest.tokenizer_vocab_size
    if rec is not None and rec != tokenizer_vocab_size:
        raise ExportFolderError(f"{f} has {tokenizer_vocab_size} tokens but the model was exported with a "
                                f"tokenizer of {rec}: the tokenizer belongs to another model; {fix}")
