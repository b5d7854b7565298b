"""parscale-edge: ParScale (parallel scaling) language models on small devices.

The runtime path (:mod:`edge.runtime`, :mod:`edge.tokenizer`, :mod:`edge.manifest`) imports without
torch; :mod:`edge.model` and :mod:`edge.loading` need the ``export`` extra.
"""
__version__ = "0.1.0"
