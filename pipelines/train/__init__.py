"""Distributed mixed-data training on Ray Train (config tree, worker data, worker loop, driver)."""
