"""utdsl bench: the VTAB-1k / FGVC research protocol."""
