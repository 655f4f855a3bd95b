"""Data tools: turn raw dialogue dumps into clean train/val/test splits.

Also home of :mod:`dataset_tools.dialogue_format`, the one definition of the model's text format
that the trainer and the bot import as well.
"""
