"""parscale-edge: ParScale (parallel scaling) language models on small devices.

One import package built from four folders (``pyproject.toml``'s package-dir): ``edge/`` is this
package, ``export/``, ``quant/`` and ``demo/`` are its subpackages; ``python -m parscale_edge`` is
the ``parscale`` command. Layers, lowest first: the contract (``config``, ``manifest``, ``atomic``,
``hub``, ``tokenizer``) and two leaves that import nothing of the package (``evaluate``: perplexity
and KL over any logits function, numpy; ``plots``: matplotlib figures); then the torch side (``model``, ``loading``, ``adapter``, ``gguf_io``,
``corpus``, ``train``; needs the ``export`` extra) beside the runtime side (``runtime``,
``kv_cache``, ``providers``, ``validate``, ``device``; imports without torch); then the tools
(``export``, ``quant``, ``scaling_law``, ``prepare``, ``profile``, ``report``); last the faces
(``cli``, ``demo``). ``bench/`` imports library modules, never the CLI. A module imports from its
own layer or below; the torch and runtime sides never import each other (tests/test_layers.py).
README "Layout" follows ``-P`` through these layers; the ParScale spec is docs/parscale.md.
"""
__version__ = "0.1.0"
