"""DoPr: double preconditioning for test-time performance."""
