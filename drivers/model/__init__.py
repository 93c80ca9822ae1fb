"""The model backend: transformers models run by an engine inside a worker OS process."""
