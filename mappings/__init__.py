"""Declarative key-mapping tables, installed as package data (``clawconvert.mappings``).

One folder per model family, one YAML table per format; see ``clawconvert/tables.py`` for
the schema and README.md in this folder for how to read and add tables.
"""
