"""Corpora, pretraining objectives and the data pipeline."""
