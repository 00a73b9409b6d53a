"""The demo model family (fp16, int8 W8A8, awq W4A16) and the provenance manifests of model variants."""
