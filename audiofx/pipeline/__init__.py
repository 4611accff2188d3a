"""Files -> store: dataset adapters, decoding, extraction and the Zarr feature store."""
