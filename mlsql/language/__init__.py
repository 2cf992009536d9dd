"""The language: MLSQL's text as typed sqlglot trees (the dialect, its expressions, positions in
the text), the script splitter, and the one table of OPTIONS with their checker."""
