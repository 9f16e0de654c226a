"""Evaluation of synthetic sets: metrics (pure), the evaluation-only reference classifier, and the report."""
