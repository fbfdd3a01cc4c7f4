"""Reports stage: markdown, CSV and PNG plots built from a run's results.jsonl and the dataset summary."""
