"""Operators of the lung lesion MAP: one module per pipeline step, each with a plain function and a thin Operator."""
