"""Dataset stage: sources, class mapping, de-duplication, seeded splits, the manifest, image loading, transforms."""
