"""Device drivers: model backends now; cpu, gpu, memory and storage drivers plug in beside them."""
