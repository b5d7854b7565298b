"""parscale-edge: ParScale (parallel scaling) language models on small devices.

The runtime path (:mod:`parscale_edge.runtime`, :mod:`parscale_edge.tokenizer`, :mod:`parscale_edge.manifest`) imports without
torch; :mod:`parscale_edge.model` and :mod:`parscale_edge.loading` need the ``export`` extra.
"""
__version__ = "0.1.0"
