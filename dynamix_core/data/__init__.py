"""Data layer: sample records and identity maps (``records``), dataset parsers for the real on-disk
formats (``parsers``), and read access to LMDB image stores (``lmdb_io``)."""
