"""Extract stage: frozen pretrained backbones embed the manifest into validated, resumable HDF5 feature caches."""
