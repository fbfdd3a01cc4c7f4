"""Cross-stage plumbing of the study: config schemas, run folders, provenance, result rows, hashing."""
