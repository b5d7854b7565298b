"""Gradio demo (``parscale demo``): a ParScale model beside a larger dense model, answers streaming side by side.

A face (README "Layout"), like the CLI; details in docs/demo.md.

``parscale_edge.demo.models``: the default pair, export/quantize/load with memory measured (no gradio import);
``parscale_edge.demo.streaming``: one model's answer stepped token by token, and two answers taking turns;
``parscale_edge.demo.app``: the Gradio Blocks and launch. Nothing else in the toolkit imports this package.
"""
