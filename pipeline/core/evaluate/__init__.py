"""Judging and reporting results: scores of both models, report.md, the backbone comparison, the headline
summary, predictions on new images, and verification of a rerun against the committed results.
"""
