"""Gradio demo: a ParScale model beside a larger dense model.

Not implemented yet: tracked in issue #6. Nothing here is imported by the rest of the toolkit.
"""
