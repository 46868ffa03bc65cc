"""Evaluation runs from YAML: ``python -m sgl_kvtier.eval {run,list}``."""
