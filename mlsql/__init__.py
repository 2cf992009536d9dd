"""MLSQL: machine learning in SQL."""
