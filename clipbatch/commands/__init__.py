"""The commands over outputs and clusters: relabel, search, eval, report, submit, demo."""
