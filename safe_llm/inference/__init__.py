"""Sparse inference: pruned matrices kept compressed in memory and multiplied from that form.

:mod:`~safe_llm.inference.format` is the compressed layout, :mod:`~safe_llm.inference.kernel`
the C++ decode kernel and its CPU paths, :mod:`~safe_llm.inference.linear` the modules, and
:mod:`~safe_llm.inference.load` :func:`load_sparse`.
"""
