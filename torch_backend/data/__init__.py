"""Data pipeline: manifests, PyAV decoding, bucket index, resumable sampler, latent/text cache,
text encoders, the embedded product-video dataset and its analyzer (docs/data.md)."""
