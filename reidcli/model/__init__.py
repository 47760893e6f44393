"""ViT-ReID: positional encodings (APE, sin-cos, RPE), attention with a relative bias, weights."""
