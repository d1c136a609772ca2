"""The bundled demo: a procedural colour x shape world, the script that trains the
small CLIP model shipped in ``clipbatch/models/clipbatch-demo``, and ``clipbatch demo``."""
