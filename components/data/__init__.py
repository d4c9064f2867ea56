"""Dataset readers, the synthetic street-scene generator, pyramid writer/reader and loaders."""
