"""The model: layers, every attention mask, the AR Transformer (with its KV-cache forward), the noise encoder, the PFLM and the stage factory."""
