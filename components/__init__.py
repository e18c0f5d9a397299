"""Reusable Dash pieces: the app shell, input panels, token strips, alerts and figure builders.

Builders are ``make_<thing>(...)`` functions. Figure builders take numpy arrays and plain Python
values, never tensors: nothing here imports torch or TransformerLens.
"""
